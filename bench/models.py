"""Denoising networks. Every model maps (x_t, t) -> prediction of x's shape; t holds integer
timestep indices. ``ARCHS`` is the registry: a plain dict of name -> (builder config, doc)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ConfigError


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, as in DDPM."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020): ResBlocks with timestep embedding, attention at the
    listed resolutions, nearest-neighbour upsampling, skip connections by concatenation."""

    def __init__(self, in_ch=3, resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, groups=32):
        super().__init__()
        self.ch = ch
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # Downsampling path; remember every feature map's width for the skips.
        self.down = nn.ModuleList()
        widths, cur, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb_dim, dropout, groups)]
                cur = ch * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cur, groups))
                self.down.append(nn.ModuleList(blocks))
                widths.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                widths.append(cur)
                res = (res + 1) // 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_dim, dropout, groups), AttnBlock(cur, groups),
                                  ResBlock(cur, cur, temb_dim, dropout, groups)])

        # Upsampling path: one block more per level than going down, to consume every skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(cur + widths.pop(), ch * mult, temb_dim, dropout, groups)]
                cur = ch * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cur, groups))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.norm_out = norm(cur, groups)
        self.conv_out = nn.Conv2d(cur, in_ch, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb(timestep_embedding(t, self.ch))
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            for b in blocks:
                h = b(h, temb) if isinstance(b, ResBlock) else b(h)
            skips.append(h)
        for b in self.mid:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                skip = skips.pop()
                if skip.shape[-2:] != h.shape[-2:]:  # odd sizes (28 -> 14 -> 7 -> 4): crop back
                    h = h[..., : skip.shape[-2], : skip.shape[-1]]
                h = torch.cat([h, skip], dim=1)
            for b in blocks:
                h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return self.conv_out(F.silu(self.norm_out(h)))


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
}


def build_model(arch: str, in_ch: int, resolution: int) -> nn.Module:
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return UNet(in_ch=in_ch, resolution=resolution, **ARCHS[arch][0])
