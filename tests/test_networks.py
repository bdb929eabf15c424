"""The networks of bench.models.networks: tiny ADM and DiT forward passes, the class-conditioning contract,
parameter counts of the full-size networks (on the meta device, nothing allocated), and the DDPM
U-Net the committed results were trained with, unchanged."""

import hashlib
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from bench.errors import ConfigError
from bench.models.adm import ADMUNet, AttentionBlock
from bench.models.dit import DiT, sincos_2d
from bench.models.networks import ARCHS, UNet, build_model, count_parameters

K = 5  # classes of the tiny conditional networks


def tiny_adm(**kw):
    return ADMUNet(**{**dict(in_ch=3, resolution=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             attention_ds=(2,), num_heads=2), **kw})


def tiny_dit(**kw):
    return DiT(**{**dict(in_ch=3, resolution=16, patch=4, hidden=64, depth=2, heads=4), **kw})


TINY = {"adm": tiny_adm, "dit": tiny_dit, "ddpm": lambda **kw: UNet(**{**ARCHS["unet-tiny"][0],
                                                                        "in_ch": 3, "resolution": 16, **kw})}


def randomized(model):
    """ADM and DiT start with zero outputs (zero convs, adaLN-Zero), where every input gives the same
    answer; random weights make the checks below able to fail."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def inputs(batch=2, ch=3, res=16):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, ch, res, res, generator=gen), torch.tensor([3, 900][:batch])


# -- forward passes and the conditioning contract -----------------------------------------------

@pytest.mark.parametrize("net", sorted(TINY))
@pytest.mark.parametrize("res", [16, 32])
def test_tiny_networks_map_x_to_its_shape(net, res):
    model = randomized(TINY[net](resolution=res))
    x, t = inputs(res=res)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("net", sorted(TINY))
def test_out_ch_widens_only_the_output(net):
    model = randomized(TINY[net](out_ch=6))
    x, t = inputs()
    with torch.no_grad():
        assert model(x, t).shape == (2, 6, 16, 16)


@pytest.mark.parametrize("net", sorted(TINY))
def test_labels_condition_and_none_means_the_null_row(net):
    model = randomized(TINY[net](num_classes=K))
    table = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert len(table) == 1 and table[0].num_embeddings == K + 1
    x, t = inputs()
    null = torch.full((2,), K)
    with torch.no_grad():
        uncond = model(x, t)
        assert torch.equal(uncond, model(x, t, null))
        assert not torch.allclose(uncond, model(x, t, torch.tensor([0, 1])))
        assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1])))
        # y=None reads row K: changing that row changes it, and leaves real labels alone.
        labelled = model(x, t, torch.tensor([0, 1]))
        table[0].weight[K] += 1.0
        assert not torch.allclose(uncond, model(x, t))
        assert torch.equal(labelled, model(x, t, torch.tensor([0, 1])))


@pytest.mark.parametrize("net", sorted(TINY))
def test_label_mistakes_are_refused(net):
    x, t = inputs()
    with pytest.raises(ValueError, match="unconditional"):
        TINY[net]()(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        TINY[net](num_classes=K)(x, t, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("net", sorted(TINY))
def test_a_training_step_reaches_finite_gradients(net):
    model = TINY[net](num_classes=K).train()
    x, t = inputs()
    loss = model(x, t, torch.tensor([0, K])).square().mean() + model(x, t).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_adm_and_dit_start_at_zero_output():
    """The original initialisations: zero output conv (ADM), adaLN-Zero and zero final linear (DiT)."""
    x, t = inputs()
    for model in (tiny_adm(num_classes=K), tiny_dit(num_classes=K)):
        with torch.no_grad():
            assert torch.equal(model(x, t, torch.tensor([0, 1])), torch.zeros_like(x))


# -- ADM details ---------------------------------------------------------------------------------

def test_adm_attention_is_qkv_attention_in_the_new_order():
    """Against guided-diffusion's QKVAttention formula: q, k, v split first, then heads; q and k each
    scaled by d^(-1/4); softmax over keys."""
    torch.manual_seed(0)
    block = AttentionBlock(32, num_heads=4)
    nn.init.normal_(block.proj.weight)
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x.reshape(2, 32, 16)))
        q, k, v = qkv.chunk(3, dim=1)
        d = 32 // 4
        s = d ** -0.25
        w = torch.einsum("bct,bcs->bts", (q * s).reshape(8, d, 16), (k * s).reshape(8, d, 16)).softmax(-1)
        a = torch.einsum("bts,bcs->bct", w, v.reshape(8, d, 16)).reshape(2, 32, 16)
        expected = (x.reshape(2, 32, 16) + block.proj(a)).reshape(x.shape)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_ddpm_attention_is_single_head_softmax_attention_over_pixels():
    """DDPM's AttnBlock against the formula: softmax(q k^T / sqrt(C)) v over the H x W pixels, one head."""
    from bench.models.unet import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(16, groups=8)
    nn.init.normal_(block.proj.weight)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        q, k, v = block.qkv(block.norm(x)).reshape(2, 3, 16, 16).unbind(1)  # [B, C, HW] each
        w = (torch.einsum("bct,bcs->bts", q, k) / math.sqrt(16)).softmax(-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(x.shape)
        assert torch.allclose(block(x), x + block.proj(a), atol=1e-5)


@pytest.mark.parametrize("block", [lambda: AttentionBlock(32, num_heads=4), lambda: __import__(
    "bench.models.unet", fromlist=["AttnBlock"]).AttnBlock(32, groups=8)], ids=["adm", "ddpm"])
def test_attention_hands_sdpa_contiguous_4d_tensors(block, monkeypatch):
    """SDPA's fused kernels (flash, memory-efficient) take 4-D q, k, v with a unit last stride; otherwise
    it falls back to the math kernel, which materialises B x heads x (HW)^2 scores."""
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.extend((z.dim(), z.stride(-1)) for z in (q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        block()(torch.randn(2, 32, 4, 4))
    assert seen == [(4, 1)] * 3


def test_adm_attention_sits_at_the_imagenet128_places():
    """At 128 px: after the ResBlocks at 32, 16 and 8 px (2 per level going down, 3 going up) and in
    the middle: 6 + 1 + 9 attention blocks; ResBlocks resample between the 5 levels (4 down, 4 up)."""
    with torch.device("meta"):
        model = build_model("adm-unet", 3, 128)
    assert sum(isinstance(m, AttentionBlock) for m in model.modules()) == 16
    resamples = [m.resample for m in model.modules() if getattr(m, "resample", None)]
    assert resamples.count("down") == 4 and resamples.count("up") == 4
    assert all(m.num_heads == 4 for m in model.modules() if isinstance(m, AttentionBlock))


# -- DiT details ---------------------------------------------------------------------------------

def test_dit_pos_embed_is_the_fixed_2d_sincos_table():
    """Against the MAE/DiT numpy construction: a meshgrid with x first; the first half of the width
    encodes x (the column), the second y (the row); each half [sin | cos] of pos / 10000^(i/(w/4))."""
    width, grid = 16, 3
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    gx, gy = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one_d(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    expected = np.concatenate([one_d(gx), one_d(gy)], axis=1)
    assert np.allclose(sincos_2d(width, grid).numpy(), expected, atol=1e-6)
    model = tiny_dit()
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" not in model.state_dict()
    assert torch.allclose(model.pos_embed[0], sincos_2d(64, 4))


def test_dit_unpatchify_inverts_the_patch_layout():
    """Token (i, j) holds its patch's values in (row, column, channel) order, as in the original."""
    model = tiny_dit(resolution=8, patch=2, out_ch=3)
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tokens = img.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 2 * 2 * 3)
    assert torch.equal(model.unpatchify(tokens), img)


def test_dit_tokens_see_their_position():
    """A constant image gives different outputs at different patches only through the positions."""
    model = randomized(tiny_dit())
    with torch.no_grad():
        out = model(torch.ones(1, 3, 16, 16), torch.tensor([10]))
    assert not torch.allclose(out[..., :4, :4], out[..., 4:8, 4:8])


# -- the registry, errors, parameter counts ------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_registry_network_builds_on_meta_at_32px(arch):
    with torch.device("meta"):
        model = build_model(arch, 3, 32)
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == count_parameters(arch, 3, 32)


def test_registry_docs_state_the_counts_of_their_networks():
    """Each doc's "N M parameters at 3 channels, 32 px, unconditional" is what count_parameters says."""
    stated = {a: re.search(r"([\d.]+)M parameters at 3 channels, 32 px, unconditional", doc)
              for a, (_, doc) in ARCHS.items()}
    new = [a for a, (settings, _) in ARCHS.items() if "net" in settings]
    assert len(new) == 13 and all(stated[a] for a in new)
    for arch, match in stated.items():
        if match:
            assert count_parameters(arch, 3, 32) / 1e6 == pytest.approx(float(match[1]), abs=0.006), arch


def test_count_parameters_allocates_nothing_and_leaves_the_rng_alone():
    before = torch.get_rng_state()
    assert count_parameters("dit-xl/2", 3, 32) > 600e6
    assert torch.equal(before, torch.get_rng_state())


def test_adm_imagenet128_has_421_5m_parameters():
    """Conditional on 1000 classes, learn_sigma (6 output channels), as the README trains it.
    421,529,606 is guided-diffusion's UNetModel counted layer by layer from its code; ours adds the
    null label row (1024 = 4 * 256)."""
    n = count_parameters("adm-unet", 3, 128, num_classes=1000, out_ch=6)
    assert abs(n - 421.5e6) / 421.5e6 < 0.005, n
    assert n == 421_529_606 + 1024
    # Resolution-free: the same weights serve 32 px (attention at 8, 4, 2 px there).
    assert count_parameters("adm-unet", 3, 32, num_classes=1000, out_ch=6) == n


@pytest.mark.parametrize("arch, official_m", [("dit-s/2", 32.96), ("dit-b/2", 130.51), ("dit-l/2", 458.10),
                                              ("dit-xl/2", 675.13)])
def test_dit_counts_match_the_paper(arch, official_m):
    """The official counts: 4 -> 8 channels at 32x32 (256 px latents), 1000 classes + the null row,
    and the frozen pos-embed Parameter, which is a buffer here (tokens * width fewer)."""
    n = count_parameters(arch, 4, 32, num_classes=1000, out_ch=8)
    assert abs(n - official_m * 1e6) / (official_m * 1e6) < 0.005, n
    width = ARCHS[arch][0]["hidden"]
    assert round((n + 16 * 16 * width) / 1e4) == round(official_m * 100)


@pytest.mark.parametrize("arch, res, match", [
    ("dit-b/2", 33, "dit-b/2 needs a resolution divisible by its patch size 2; got 33"),
    ("dit-s/8", 28, "dit-s/8 needs a resolution divisible by its patch size 8; got 28"),
    ("adm-unet", 28, "adm-unet needs a resolution divisible by 16"),
    ("dit-h/2", 32, "unknown architecture 'dit-h/2'; known: .*dit-xl/8"),
])
def test_bad_architecture_or_resolution_is_a_one_line_config_error(arch, res, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_model(arch, 3, res)
    assert "\n" not in str(err.value)


def test_negative_num_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("unet-tiny", 3, 16, num_classes=-1)


# -- the DDPM U-Net of the committed results -----------------------------------------------------

def state_sha256(model) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_ddpm_unet_weights_at_a_seed_are_those_of_the_committed_results():
    """Guards the committed benchmark results: the hash of torch.manual_seed(0); build_model("ddpm-unet",
    3, 32) was computed from the code before class conditioning was added. Creating a parameter, or
    one in another order, changes it."""
    torch.manual_seed(0)
    model = build_model("ddpm-unet", 3, 32)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert state_sha256(model) == "b9d5af6fd2333752fa3d9057f01105a3c865d2f0ff2b7079a17f9457ad31e77e"


def test_conditional_ddpm_unet_differs_only_by_its_label_table():
    torch.manual_seed(0)
    plain = build_model("unet-tiny", 1, 16).eval()
    torch.manual_seed(0)
    cond = build_model("unet-tiny", 1, 16, num_classes=K).eval()
    a, b = plain.state_dict(), cond.state_dict()
    assert set(b) - set(a) == {"label_emb.weight"} and b["label_emb.weight"].shape == (K + 1, 128)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The label enters only as an added embedding: with a zero table the outputs are bit-identical.
    with torch.no_grad():
        cond.label_emb.weight.zero_()
        x, t = inputs(ch=1)
        assert torch.equal(plain(x, t), cond(x, t, torch.tensor([0, K])))


def test_frequency_embedding_matches_the_adm_formula():
    from bench.models.layers import frequency_embedding

    t, dim = torch.tensor([0, 7, 999]), 6
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 7, 999)]
    assert torch.allclose(frequency_embedding(t, dim), torch.tensor(expected), atol=1e-4)
    assert frequency_embedding(t, 7).shape == (3, 7)  # an odd width is padded
