"""Denoising networks: shared layers, the DDPM U-Net, ADM, DiT, and the architecture table
(networks.ARCHS, build_model). Imports only bench.errors."""
