"""The ADM U-Net of Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (2021),
after UNetModel in openai/guided-diffusion guided_diffusion/unet.py, in the form its README trains on
ImageNet 128x128:

    --attention_resolutions 32,16,8 --class_cond True --image_size 128 --learn_sigma True
    --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True
    --use_scale_shift_norm True   (channel_mult (1, 1, 2, 3, 4), the script's choice at 128 px)

That network, conditional on 1000 classes with 6 output channels (learn_sigma), has 421.5M parameters.

Written for this project, not copied. What is kept from the original: GroupNorm with 32 groups
computed in float32, SiLU, ResBlocks with scale-shift norm (AdaGN: the embedding gives a scale and a
shift applied after the second norm), residual blocks that resample (average pooling down, nearest
up), multi-head attention whose output projection, like each ResBlock's last conv and the output
conv, starts at zero, timestep embedding of width 4 * model_channels plus an optional label embedding.

What differs:
  * Attention places are downsample factors of the input (attention_ds = (4, 8, 16) is 32, 16 and 8 px
    at 128 px; 8, 4 and 2 px at 32 px), so the same settings work at any resolution that
    2^(levels - 1) divides; the original's flags name pixel sizes at 128 px.
  * q, k, v are split before the heads (QKVAttention, "new order"); the README's flags leave
    use_new_attention_order off, so the released checkpoints use the legacy layout. Same parameters
    and function class; only loading those checkpoints would need a permutation of the qkv weights.
  * Attention runs through F.scaled_dot_product_attention (the same softmax(q k^T / sqrt(d)) v).
  * The label table has K + 1 rows (row K: the null label of classifier-free guidance; see bench.models.networks).
  * Parameters stay float32; --use_fp16 is the harness's precision setting (autocast), not the network's.
"""

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.layers import LabelTable, frequency_embedding, no_labels


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups, computed in float32 and cast back (the original's guard for fp16)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def zeroed(module: nn.Module) -> nn.Module:
    """The module with every parameter zero: a residual branch that starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """norm, SiLU, [resample], conv; scale-shift norm from the embedding; SiLU, dropout, zero conv.

    resample "down" halves the feature map by 2x2 average pooling, "up" doubles it by nearest
    neighbours, on both the branch and the skip (the original's resblock_updown)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.norm_in = GroupNorm32(cin)
        self.conv_in = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # a scale and a shift per channel
        self.norm_out = GroupNorm32(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zeroed(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        # Resample after the first norm and activation, before the conv, as the original does.
        h = self.conv_in(self._resample(F.silu(self.norm_in(x))))
        scale, shift = self.emb(F.silu(emb)).type(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale) + shift
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(self._resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels, residual, output projection zero at the start."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x, emb=None):  # emb: unused, so that every block takes (h, emb)
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        # "New order": split q, k, v first, then each into heads of C / num_heads channels.
        # contiguous: SDPA's flash and memory-efficient kernels refuse a non-unit last stride, and its
        # math kernel would materialise B x heads x (HW)^2 scores
        q, k, v = (z.reshape(B, self.num_heads, C // self.num_heads, H * W).transpose(2, 3).contiguous()
                   for z in self.qkv(self.norm(flat)).chunk(3, dim=1))
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H * W)
        return (flat + self.proj(h)).reshape(B, C, H, W)


class ADMUNet(nn.Module):
    """The ADM U-Net (see the module doc). Feature widths model_channels * channel_mult[level];
    num_res_blocks ResBlocks per level going down, one more going up (consuming every skip);
    attention after the ResBlocks whose feature map is 1/f of the input for f in attention_ds,
    and in the middle; ResBlocks with resample="down"/"up" between levels."""

    def __init__(self, in_ch=3, resolution=128, model_channels=256, channel_mult=(1, 1, 2, 3, 4),
                 num_res_blocks=2, attention_ds=(4, 8, 16), num_heads=4, dropout=0.0,
                 num_classes=0, out_ch=None):
        super().__init__()
        levels = len(channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1} "
                             f"({levels - 1} down-samplings)")
        self.model_channels = model_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.label_emb = LabelTable(num_classes, emb_dim) if num_classes else None
        res_block = lambda cin, cout, resample=None: ResBlock(cin, cout, emb_dim, dropout, resample)  # noqa: E731
        attention = lambda ch: AttentionBlock(ch, num_heads)  # noqa: E731

        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        # Going down: remember every feature map's width for the skips.
        self.down = nn.ModuleList()
        widths, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_ds:
                    blocks.append(attention(ch))
                self.down.append(nn.ModuleList(blocks))
                widths.append(ch)
            if level != levels - 1:
                self.down.append(nn.ModuleList([res_block(ch, ch, "down")]))
                widths.append(ch)
                ds *= 2

        self.mid = nn.ModuleList([res_block(ch, ch), attention(ch), res_block(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [res_block(ch + widths.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_ds:
                    blocks.append(attention(ch))
                if level and i == num_res_blocks:  # the level's last block also upsamples
                    blocks.append(res_block(ch, ch, "up"))
                    ds //= 2
                self.up.append(nn.ModuleList(blocks))

        self.norm_out = GroupNorm32(ch)
        self.conv_out = zeroed(nn.Conv2d(ch, out_ch or in_ch, 3, padding=1))

    def forward(self, x, t, y=None):
        emb = self.time_embed(frequency_embedding(t, self.model_channels))
        if self.label_emb is None:
            no_labels(y)
        else:
            emb = emb + self.label_emb(y, x.shape[0])
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
