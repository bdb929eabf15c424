"""Denoising networks. Every model maps (x_t, t, y=None) -> prediction of x's shape; t holds integer
timestep indices. ``ARCHS`` is the registry: a plain dict of name -> (builder config, doc); the
settings key "net" picks the class ("adm": bench.adm.ADMUNet, "dit": bench.dit.DiT, none: the DDPM
UNet here).

Class conditioning, the same for every network: with num_classes = K > 0 the network holds a label
table of K + 1 rows; row K is the null label of classifier-free guidance (the harness drops labels
to K). y is a LongTensor [B] of values 0..K, and y=None means every label is null. With K = 0 the
network has no table and y must be None."""

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


# Settings are the class's keyword arguments; "net" picks the class (none: the DDPM UNet above).
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
    net = settings.pop("net", "ddpm")
    common = dict(in_ch=in_ch, resolution=resolution, num_classes=num_classes, out_ch=out_ch)
    # Imported here: bench.adm and bench.dit import the shared pieces (LabelTable, ...) from this module.
    if net == "adm":
        from bench.adm import ADMUNet

        downs = len(settings["channel_mult"]) - 1
        _require_divisible(arch, resolution, 2**downs, f"{2**downs} (its {downs} down-samplings)")
        return ADMUNet(**common, **settings)
    if net == "dit":
        from bench.dit import DiT

        _require_divisible(arch, resolution, settings["patch"], f"its patch size {settings['patch']}")
        return DiT(**common, **settings)
    return UNet(**common, **settings)


def count_parameters(arch: str, in_ch: int, resolution: int, num_classes: int = 0, out_ch: int | None = None) -> int:
    """Parameters of build_model(...) without allocating them: the network is built on the meta device
    (shapes only, no memory, no initialisation, and the global RNG is left alone)."""
    with torch.device("meta"):
        model = build_model(arch, in_ch, resolution, num_classes, out_ch)
    return sum(p.numel() for p in model.parameters())
