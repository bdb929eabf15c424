"""Pieces every network shares: timestep embeddings, the label table of class conditioning (row K:
the null label), and GroupNorm as the DDPM U-Net uses it."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def frequency_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps as GLIDE/ADM write it (guided-diffusion nn.py, reused by DiT):
    cos before sin, frequencies max_period^(-i/half). The DDPM form above differs (sin first, /(half-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # an odd width gets one zero column


class LabelTable(nn.Embedding):
    """Class labels 0..K-1 plus the null label K of classifier-free guidance (K + 1 rows)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes

    def forward(self, y: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if y is None:  # unconditional call of a conditional network: every label is the null one
            y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.weight.device)
        elif y.shape != (batch_size,):
            raise ValueError(f"labels y must have shape ({batch_size},), one per image; got {tuple(y.shape)}")
        # No range check on the values: it would synchronise a GPU every step (an index out of
        # 0..K still fails inside the embedding).
        return super().forward(y)


def no_labels(y: torch.Tensor | None) -> None:
    """The check of an unconditional network (num_classes=0): labels would be silently ignored."""
    if y is not None:
        raise ValueError("this network is unconditional (num_classes=0) but got labels y: "
                         "build it with num_classes > 0, or call it with y=None")


def norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, ch), ch)
