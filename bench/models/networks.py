"""Denoising networks. Every model maps (x_t, t, y=None) -> prediction of x's shape; t holds integer
timestep indices. ``ARCHS`` is the registry: a plain dict of name -> (builder config, doc); the
settings key "net" picks the class ("adm": bench.models.adm.ADMUNet, "dit": bench.models.dit.DiT, none: the DDPM
UNet, bench.models.unet.UNet).

Class conditioning, the same for every network: with num_classes = K > 0 the network holds a label
table of K + 1 rows; row K is the null label of classifier-free guidance (the harness drops labels
to K). y is a LongTensor [B] of values 0..K, and y=None means every label is null. With K = 0 the
network has no table and y must be None."""

import json
import os

import torch
from torch import nn

from bench.errors import ConfigError
from bench.models.adm import ADMUNet
from bench.models.dit import DiT
from bench.models.unet import UNet

# Settings are the class's keyword arguments; "net" picks the class (none: the DDPM UNet of bench.models.unet).
# Docs give the parameter count of the network as the harness builds it at 3 channels, 32 px,
# unconditional (tests/test_networks.py checks these numbers), and the reference count.
ARCHS = {
    "unet-micro": (
        dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, groups=8),
        "smallest U-Net (0.27M parameters at 1 channel): the embedded default's many seeds fit a 2-core CPU",
    ),
    "unet-tiny": (
        dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, groups=8),
        "CPU-sized U-Net for the embedded default and tests (attention only in the middle block)",
    ),
    "ddpm-unet": (
        dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, groups=32),
        "DDPM CIFAR10 U-Net, 35.7M parameters (Ho et al. 2020)",
    ),
    # attention_ds: downsample factors of the input (4, 8, 16 = 32, 16, 8 px at 128 px).
    "adm-unet": (
        dict(net="adm", model_channels=256, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2,
             attention_ds=(4, 8, 16), num_heads=4, dropout=0.0),
        "ADM ImageNet-128 U-Net (Dhariwal & Nichol 2021): 420.50M parameters at 3 channels, 32 px, "
        "unconditional (421.5M conditional on 1000 classes with 6 output channels, learn_sigma)",
    ),
    # DiT sizes S, B, L, XL with patch 2, 4, 8; "paper" counts: 4 -> 8 channels, 32x32 latents, 1000 classes.
    "dit-s/2": (
        dict(net="dit", depth=12, hidden=384, heads=6, patch=2),
        "DiT-S/2 (Peebles & Xie 2023): 32.47M parameters at 3 channels, 32 px, unconditional (paper: 32.96M)",
    ),
    "dit-s/4": (
        dict(net="dit", depth=12, hidden=384, heads=6, patch=4),
        "DiT-S/4 (Peebles & Xie 2023): 32.50M parameters at 3 channels, 32 px, unconditional",
    ),
    "dit-s/8": (
        dict(net="dit", depth=12, hidden=384, heads=6, patch=8),
        "DiT-S/8 (Peebles & Xie 2023): 32.61M parameters at 3 channels, 32 px, unconditional",
    ),
    "dit-b/2": (
        dict(net="dit", depth=12, hidden=768, heads=12, patch=2),
        "DiT-B/2 (Peebles & Xie 2023): 129.53M parameters at 3 channels, 32 px, unconditional (paper: 130.51M)",
    ),
    "dit-b/4": (
        dict(net="dit", depth=12, hidden=768, heads=12, patch=4),
        "DiT-B/4 (Peebles & Xie 2023): 129.58M parameters at 3 channels, 32 px, unconditional",
    ),
    "dit-b/8": (
        dict(net="dit", depth=12, hidden=768, heads=12, patch=8),
        "DiT-B/8 (Peebles & Xie 2023): 129.81M parameters at 3 channels, 32 px, unconditional",
    ),
    "dit-l/2": (
        dict(net="dit", depth=24, hidden=1024, heads=16, patch=2),
        "DiT-L/2 (Peebles & Xie 2023): 456.79M parameters at 3 channels, 32 px, unconditional (paper: 458.10M)",
    ),
    "dit-l/4": (
        dict(net="dit", depth=24, hidden=1024, heads=16, patch=4),
        "DiT-L/4 (Peebles & Xie 2023): 456.86M parameters at 3 channels, 32 px, unconditional",
    ),
    "dit-l/8": (
        dict(net="dit", depth=24, hidden=1024, heads=16, patch=8),
        "DiT-L/8 (Peebles & Xie 2023): 457.16M parameters at 3 channels, 32 px, unconditional",
    ),
    "dit-xl/2": (
        dict(net="dit", depth=28, hidden=1152, heads=16, patch=2),
        "DiT-XL/2 (Peebles & Xie 2023): 673.65M parameters at 3 channels, 32 px, unconditional (paper: 675.13M)",
    ),
    "dit-xl/4": (
        dict(net="dit", depth=28, hidden=1152, heads=16, patch=4),
        "DiT-XL/4 (Peebles & Xie 2023): 673.74M parameters at 3 channels, 32 px, unconditional",
    ),
    "dit-xl/8": (
        dict(net="dit", depth=28, hidden=1152, heads=16, patch=8),
        "DiT-XL/8 (Peebles & Xie 2023): 674.07M parameters at 3 channels, 32 px, unconditional",
    ),
}


#: JSON {arch: {setting: value}} merged over ARCHS' settings by build_model: set by a rehearsal only
ARCH_OVERRIDES_ENV = "DIFFBENCH_ARCH_OVERRIDES"


def _require_divisible(arch: str, resolution: int, factor: int, what: str) -> None:
    if resolution % factor:
        raise ConfigError(f"{arch} needs a resolution divisible by {what}; got {resolution}: "
                          f"set resolution to a multiple of {factor}, or pick another architecture")


def build_model(arch: str, in_ch: int, resolution: int, num_classes: int = 0, out_ch: int | None = None) -> nn.Module:
    """The registry's network `arch` for in_ch-channel images of resolution x resolution px.

    num_classes > 0: class-conditional (see the module doc). out_ch: output channels, in_ch by default
    (eps, x0 or v of x's shape); more only to compare parameter counts with learn_sigma networks."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0 (0: unconditional); got {num_classes}")
    settings = dict(ARCHS[arch][0])
    # A rehearsal's smaller networks of the same kind (bench/suite/rehearse.py): {arch: {setting: value}}.
    settings.update(json.loads(os.environ.get(ARCH_OVERRIDES_ENV) or "{}").get(arch, {}))
    net = settings.pop("net", "ddpm")
    common = dict(in_ch=in_ch, resolution=resolution, num_classes=num_classes, out_ch=out_ch)
    if net == "adm":
        downs = len(settings["channel_mult"]) - 1
        _require_divisible(arch, resolution, 2**downs, f"{2**downs} (its {downs} down-samplings)")
        return ADMUNet(**common, **settings)
    if net == "dit":
        _require_divisible(arch, resolution, settings["patch"], f"its patch size {settings['patch']}")
        return DiT(**common, **settings)
    return UNet(**common, **settings)


def count_parameters(arch: str, in_ch: int, resolution: int, num_classes: int = 0, out_ch: int | None = None) -> int:
    """Parameters of build_model(...) without allocating them: the network is built on the meta device
    (shapes only, no memory, no initialisation, and the global RNG is left alone)."""
    with torch.device("meta"):
        model = build_model(arch, in_ch, resolution, num_classes, out_ch)
    return sum(p.numel() for p in model.parameters())
