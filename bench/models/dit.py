"""DiT, the Diffusion Transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers"
(ICCV 2023), after models.py in facebookresearch/DiT; here in pixel space at any resolution that the
patch size divides (the paper runs it on 32x32x4 VAE latents of 256 px images).

Written for this project, not copied. Kept from the original: a conv patch embedding (kernel = stride
= patch), a fixed 2-D sin-cos positional embedding (half the width encodes the row, half the column),
one timestep embedder (256-wide frequency embedding, then a 2-layer SiLU MLP) and one label embedder
shared by all blocks, blocks with adaLN-Zero (the conditioning vector gives shift, scale and gate for
attention and MLP: 6 * hidden), tanh-GELU MLP of ratio 4, a final layer with its own shift and scale
and a zero linear, and the original initialisation (xavier-uniform linears and patch conv, normal(0.02)
embedders, zero adaLN and output).

What differs: the positional embedding is a non-persistent buffer (the original keeps it as a frozen
Parameter, so its reported counts include hidden * tokens more: 0.29M of DiT-XL/2's 675.13M); the
label table exists only when num_classes > 0 and always has the null row (bench.models.networks' contract;
the original drops labels itself, the harness does it here); attention runs through
F.scaled_dot_product_attention.

diffusers' DiT (DiTTransformer2DModel) is a different network: every block has its own timestep and
label embedders, +10-13% parameters. This module follows the original.

Sizes (depth, hidden, heads): S (12, 384, 6), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16);
patch 2, 4 or 8. Official counts at 4 -> 8 channels, 32x32, 1000 classes (1001 rows): S/2 32.96M,
B/2 130.51M, L/2 458.10M, XL/2 675.13M.
"""

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.layers import LabelTable, frequency_embedding, no_labels

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """[grid * grid, width] sin-cos embedding of a square grid, row-major tokens: the first half of the
    width encodes the column (x), the second the row (y), each as [sin | cos] of pos * 10000^(-i/(w/4)).

    Built with torch, not numpy, so that it lands on the current default device, `meta` included."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4; got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed(p):
        angles = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


def modulate(x, shift, scale):
    """adaLN: per-image shift and scale of normalised tokens [B, T, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over tokens (timm's Attention with qkv bias)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """A DiT block with adaLN-Zero: gates start at zero, so every block starts as the identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_width, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to patch * patch * out_ch values per token."""

    def __init__(self, hidden: int, patch: int, out_ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (see the module doc): (x [B, in_ch, R, R], t [B], y [B] or None) ->
    [B, out_ch, R, R], with (R / patch)^2 tokens of width `hidden`."""

    def __init__(self, in_ch=4, resolution=32, patch=2, hidden=1152, depth=28, heads=16, mlp_ratio=4.0,
                 num_classes=0, out_ch=None):
        super().__init__()
        if resolution % patch:
            raise ValueError(f"resolution {resolution} is not divisible by the patch size {patch}")
        if hidden % heads:
            raise ValueError(f"width {hidden} does not split into {heads} attention heads")
        self.patch, self.grid, self.out_ch = patch, resolution // patch, out_ch or in_ch
        self.x_embedder = nn.Conv2d(in_ch, hidden, patch, stride=patch)
        self.t_embedder = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = LabelTable(num_classes, hidden) if num_classes else None
        # Fixed, not learned; a function of the configuration, so checkpoints need not carry it.
        self.register_buffer("pos_embed", sincos_2d(hidden, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, self.out_ch)
        self._init_weights()

    def _init_weights(self):
        """The original's initialisation (DiT.initialize_weights)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight  # like a linear over the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        # adaLN-Zero: no block changes its input at the start, and the output is zero.
        for layer in [b.ada[-1] for b in self.blocks] + [self.final_layer.ada[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """[B, grid^2, patch * patch * C] -> [B, C, grid * patch, grid * patch]."""
        B, g, p, c = x.shape[0], self.grid, self.patch, self.out_ch
        return x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)

    def forward(self, x, t, y=None):
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(frequency_embedding(t, FREQUENCY_DIM))
        if self.y_embedder is None:
            no_labels(y)
        else:
            c = c + self.y_embedder(y, x.shape[0])
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))
