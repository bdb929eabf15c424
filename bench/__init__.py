"""diffbench: a benchmark of training-acceleration methods for diffusion models."""

__version__ = "0.1.0"
