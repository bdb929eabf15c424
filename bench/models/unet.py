"""The DDPM U-Net of Ho et al. (2020), the harness's default network (the "unet-*" rows of
bench.models.networks.ARCHS)."""

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.layers import LabelTable, no_labels, norm, timestep_embedding


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
        # [B, 1 head, HW, C], contiguous: the 4-D layout SDPA's fused kernels take
        q, k, v = (z.transpose(1, 2)[:, None].contiguous() for z in self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020): ResBlocks with timestep embedding, attention at the
    listed resolutions, nearest-neighbour upsampling, skip connections by concatenation.

    num_classes > 0 adds a label table (K + 1 rows, see the module doc) whose rows are added to the
    timestep embedding. It is created after every other parameter, so that a seed gives the same
    weights with and without it, and num_classes=0 builds exactly the network of the committed results."""

    def __init__(self, in_ch=3, resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, groups=32, num_classes=0, out_ch=None):
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
        self.conv_out = nn.Conv2d(cur, out_ch or in_ch, 3, padding=1)
        self.label_emb = LabelTable(num_classes, temb_dim) if num_classes else None

    def forward(self, x, t, y=None):
        temb = self.temb(timestep_embedding(t, self.ch))
        if self.label_emb is None:
            no_labels(y)
        else:
            temb = temb + self.label_emb(y, x.shape[0])
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
