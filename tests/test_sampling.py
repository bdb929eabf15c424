"""Samplers against a model whose optimum is known in closed form, and the fixed-noise contract.

Data x0 ~ N(mu, s^2) per pixel. With x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, x_t ~ N(sqrt(ab) mu, d)
with d = ab s^2 + 1 - ab, and the MSE-optimal predictors are the conditional means
    E[eps | x_t] = sqrt(1 - ab) / d * (x_t - sqrt(ab) mu)
    E[x0  | x_t] = mu + sqrt(ab) s^2 / d * (x_t - sqrt(ab) mu)
    E[v   | x_t] = sqrt(ab) E[eps | x_t] - sqrt(1 - ab) E[x0 | x_t]
(test_closed_form_predictor_is_the_regression_optimum checks them by least squares).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.core.diffusion import make_schedule
from bench.errors import ConfigError
from bench.eval.sampling import (
    draw_noise,
    image_generators,
    image_seed,
    sample,
    sample_batch,
    save_pngs,
    timestep_sequence,
    to_uint8,
)

MU, S = 0.3, 0.5


class GaussianOptimum(nn.Module):
    """The exact denoiser for N(mu, s^2) data, returning the eps, x0 or v target."""

    def __init__(self, schedule, mu=MU, s=S, kind="eps"):
        super().__init__()
        self.register_buffer("ab", schedule.alphas_bar.clone().double())
        self.mu, self.s2, self.kind = mu, s * s, kind
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        ab = self.ab[t].view(-1, *([1] * (x.ndim - 1)))
        x = x.double()
        d = ab * self.s2 + 1 - ab
        r = x - ab.sqrt() * self.mu
        eps = r * (1 - ab).sqrt() / d
        x0 = self.mu + ab.sqrt() * self.s2 * r / d
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.kind]
        return out.float()


@pytest.fixture(scope="module")
def linear():
    return make_schedule("linear", 1000)


def test_closed_form_predictor_is_the_regression_optimum(linear):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t in (10, 300, 900):
        x0 = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        ab = linear.alphas_bar[t]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        design = torch.stack([xt, torch.ones_like(xt)], 1)
        for kind, y in (("eps", eps), ("x0", x0)):
            coef = torch.linalg.lstsq(design, y[:, None]).solution.squeeze()
            model = GaussianOptimum(linear, kind=kind)
            tt = torch.full((2,), t)
            pred = model(torch.tensor([[0.0], [1.0]]), tt).double().squeeze()
            slope, intercept = pred[1] - pred[0], pred[0]
            assert abs(slope - coef[0]) < 0.01 and abs(intercept - coef[1]) < 0.01, (t, kind, coef, slope, intercept)


def _stats(x):
    return x.double().mean().item(), x.double().std().item()


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("cfg", [dict(sampler="ddim", steps=1000, eta=1.0),
                                 dict(sampler="ddpm", steps=1000, ddpm_variance="large"),
                                 dict(sampler="ddpm", steps=1000, ddpm_variance="small")],
                         ids=["ddim-eta1", "ddpm-large", "ddpm-small"])
def test_stochastic_samplers_match_gaussian_target(linear, kind, cfg):
    x = sample(GaussianOptimum(linear, kind=kind), linear, kind, 128, (1, 16, 16), batch_size=128,
               clip_x0=False, noise_seed=1, **cfg)
    mean, std = _stats(x)  # 32768 values: standard errors 0.003 (mean) and 0.4% (std)
    assert abs(mean - MU) < 0.015, mean
    assert abs(std / S - 1) < 0.03, std
    # A wrong chain (e.g. no per-step noise, or sigma^2 doubled) moves the std far more.
    assert x.abs().max() > 1.0  # no hidden clamping with clip_x0=False


def _ddim_chain_moments(schedule, steps, eta, mu=MU, s=S):
    """Exact mean and std of DDIM's output for the Gaussian optimum (a linear-Gaussian chain),
    from Song et al. 2021 eq. 12 written out independently of bench/eval/sampling.py."""
    ab_all = schedule.alphas_bar.tolist()
    T = schedule.T
    ts = [round(T - k * T / steps) - 1 for k in range(steps)]
    m, var = 0.0, 1.0
    for k, t in enumerate(ts):
        ab = ab_all[t]
        d = ab * s * s + 1 - ab
        A, B = math.sqrt(ab) * s * s / d, math.sqrt(1 - ab) / d
        if k == len(ts) - 1:
            return mu + A * (m - math.sqrt(ab) * mu), abs(A) * math.sqrt(var)
        abp = ab_all[ts[k + 1]]
        sigma = eta * math.sqrt((1 - abp) / (1 - ab) * (1 - ab / abp))
        c = math.sqrt(1 - abp - sigma**2)
        gain = math.sqrt(abp) * A + c * B
        m = math.sqrt(abp) * mu + gain * (m - math.sqrt(ab) * mu)
        var = gain**2 * var + sigma**2


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("steps,eta", [(50, 0.0), (50, 1.0), (20, 0.5)])
def test_short_ddim_matches_its_exact_chain(linear, kind, steps, eta):
    """With few steps DDIM is biased (here 5-13% low in std); its output must still be exactly
    the distribution of the discrete chain, which checks sigma and the eps coefficient."""
    want_mean, want_std = _ddim_chain_moments(linear, steps, eta)
    x = sample(GaussianOptimum(linear, kind=kind), linear, kind, 128, (1, 16, 16), batch_size=64,
               clip_x0=False, sampler="ddim", steps=steps, eta=eta, noise_seed=2)
    mean, std = _stats(x)
    assert abs(mean - want_mean) < 0.015, (mean, want_mean)
    assert abs(std / want_std - 1) < 0.02, (std, want_std)


def test_ddim_eta0_long_chain_matches_target_cosine():
    cos = make_schedule("cosine", 1000)
    x = sample(GaussianOptimum(cos, kind="v"), cos, "v", 128, (1, 16, 16), clip_x0=False, sampler="ddim",
               steps=500, eta=0.0, noise_seed=3)
    mean, std = _stats(x)
    assert abs(mean - MU) < 0.015 and abs(std / S - 1) < 0.03, (mean, std)


def test_ddpm_small_variance_equals_ddim_eta1(linear):
    m = GaussianOptimum(linear, kind="eps")
    a = sample(m, linear, "eps", 16, (1, 8, 8), sampler="ddpm", steps=100, ddpm_variance="small", clip_x0=True)
    b = sample(m, linear, "eps", 16, (1, 8, 8), sampler="ddim", steps=100, eta=1.0, clip_x0=True)
    c = sample(m, linear, "eps", 16, (1, 8, 8), sampler="ddpm", steps=100, ddpm_variance="large", clip_x0=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert (a - c).abs().max() > 1e-2  # the large variance is a different chain


def test_prediction_kinds_give_the_same_samples(linear):
    out = [sample(GaussianOptimum(linear, kind=k), linear, k, 8, (1, 8, 8), sampler="ddim", steps=25, eta=0.5,
                  clip_x0=False) for k in ("eps", "x0", "v")]
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0], out[2], atol=1e-4, rtol=0)


class TinyConv(nn.Module):
    """A small untrained conv net (depends on t), deterministic for a fixed seed."""

    def __init__(self, ch=1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.2 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (t.float() / 1000).view(-1, 1, 1, 1)


@pytest.mark.parametrize("cfg", [dict(sampler="ddim", steps=20, eta=0.0), dict(sampler="ddim", steps=20, eta=1.0),
                                 dict(sampler="ddpm", steps=30)])
def test_same_noise_for_same_image_across_batch_sizes(linear, cfg):
    m = GaussianOptimum(linear, kind="eps")  # per-pixel model: the batch layout cannot leak in
    full = sample(m, linear, "eps", 10, (1, 6, 6), batch_size=10, noise_seed=7, **cfg)
    for bs in (1, 3, 4):
        torch.testing.assert_close(sample(m, linear, "eps", 10, (1, 6, 6), batch_size=bs, noise_seed=7, **cfg),
                                   full, atol=0, rtol=0)
    # Images 7 and 3 alone, in another order, and image 5 as part of a later range.
    part = sample_batch(m, linear, "eps", [7, 3], (1, 6, 6), noise_seed=7, **cfg)
    torch.testing.assert_close(part, full[[7, 3]], atol=0, rtol=0)
    later = sample(m, linear, "eps", 4, (1, 6, 6), start_index=5, batch_size=3, noise_seed=7, **cfg)
    torch.testing.assert_close(later, full[5:9], atol=0, rtol=0)
    # A conv model mixes pixels but not images: the same up to float round-off.
    conv = TinyConv()
    a = sample(conv, linear, "eps", 9, (1, 6, 6), batch_size=9, noise_seed=7, **cfg)
    b = sample(conv, linear, "eps", 9, (1, 6, 6), batch_size=2, noise_seed=7, **cfg)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Different images and different seeds differ.
    other = sample(m, linear, "eps", 10, (1, 6, 6), batch_size=10, noise_seed=8, **cfg)
    assert (other - full).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (full[0] - full[1]).abs().max() > 1e-3


def test_noise_is_independent_of_global_rng(linear):
    m = GaussianOptimum(linear, kind="eps")
    torch.manual_seed(0)
    a = sample(m, linear, "eps", 4, (1, 4, 4), sampler="ddpm", steps=10)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    b = sample(m, linear, "eps", 4, (1, 4, 4), sampler="ddpm", steps=10)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.manual_seed(0)
    sample(m, linear, "eps", 4, (1, 4, 4), sampler="ddpm", steps=10)
    assert torch.equal(torch.get_rng_state(), state)  # sampling consumed no global randomness


def test_initial_noise_is_a_function_of_seed_and_index():
    a = draw_noise(image_generators(5, [0, 1, 2]), (1, 3, 3))
    b = draw_noise(image_generators(5, [2]), (1, 3, 3))
    torch.testing.assert_close(a[2:], b, atol=0, rtol=0)
    assert image_seed(5, 2) != image_seed(5, 3) != image_seed(6, 2)
    # SplitMix64's published first output for state 0 (Steele et al. 2014; Vigna's reference code),
    # and image_seed as its documented composition: every committed number rests on these values.
    from bench.eval.sampling import _splitmix64

    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert image_seed(0, 0) == _splitmix64(0xE220A8397B1DCDAF) & (2**63 - 1)
    assert 0 <= image_seed(2**40, 10**9) < 2**63
    # Standard normal: check the first two moments over many images.
    z = draw_noise(image_generators(0, range(2000)), (1, 4, 4))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_model_is_called_once_per_step_per_batch(linear):
    m = GaussianOptimum(linear, kind="eps")
    sample(m, linear, "eps", 10, (1, 4, 4), batch_size=4, sampler="ddim", steps=7)
    assert m.calls == 3 * 7


def test_timestep_sequences():
    assert timestep_sequence(1000, 1000) == list(range(999, -1, -1))
    tr = timestep_sequence(1000, 50)
    assert tr[0] == 999 and len(tr) == 50 and all(a > b for a, b in zip(tr, tr[1:])) and tr[-1] == 19
    le = timestep_sequence(1000, 50, "leading")
    assert le[0] == 980 and le[-1] == 0
    li = timestep_sequence(1000, 50, "linspace")
    assert li[0] == 999 and li[-1] == 0
    with pytest.raises(ConfigError, match="1..1000"):
        timestep_sequence(1000, 1001)


def test_to_uint8_matches_a_png_written_by_save_image(tmp_path):
    from PIL import Image
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2.4 - 1.2  # includes out-of-range values
    ties = (torch.arange(256, dtype=torch.float32) + 0.5) / 127.5 - 1  # exactly halfway values
    x[0, 0] = ties[:256].view(16, 16)
    for k in range(2):
        save_image((x[k] + 1) / 2, tmp_path / f"{k}.png")
        png = torch.from_numpy(np.array(Image.open(tmp_path / f"{k}.png"))).permute(2, 0, 1)
        assert torch.equal(to_uint8(x[k]), png), k
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and int(u.min()) == 0 and int(u.max()) == 255
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    # Our own PNG writer stores exactly these bytes (grey and colour).
    paths = save_pngs(u[:, :1], tmp_path / "grey") + save_pngs(u, tmp_path / "rgb")
    grey = np.array(Image.open(paths[1]))
    rgb = np.array(Image.open(paths[3]))
    assert np.array_equal(grey, u[1, 0].numpy()) and np.array_equal(rgb, u[1].permute(1, 2, 0).numpy())


def test_channels_last_model_gives_the_same_images(linear):
    conv = TinyConv(ch=3)
    a = sample(conv, linear, "eps", 6, (3, 8, 8), steps=10, eta=1.0)
    conv = conv.to(memory_format=torch.channels_last)
    b = sample(conv, linear, "eps", 6, (3, 8, 8), steps=10, eta=1.0, batch_size=4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_model_mode_is_restored(linear):
    conv = TinyConv().train()
    sample(conv, linear, "eps", 2, (1, 4, 4), steps=3)
    assert conv.training
    conv.eval()
    sample(conv, linear, "eps", 2, (1, 4, 4), steps=3)
    assert not conv.training


@pytest.mark.parametrize("spacing", ["linspace", "leading", "quadratic"])
@pytest.mark.parametrize("steps", [2, 10, 20])
def test_spacings_that_end_at_t0(spacing, steps):
    ts = timestep_sequence(1000, steps, spacing)
    assert ts[-1] == 0 and len(set(ts)) == steps and ts == sorted(ts, reverse=True)


def test_trailing_with_few_steps_never_visits_small_t_and_quadratic_does():
    assert min(timestep_sequence(1000, 10, "trailing")) == 99
    assert timestep_sequence(1000, 10, "quadratic") == [999, 789, 604, 444, 308, 197, 111, 49, 12, 0]
    assert timestep_sequence(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    with pytest.raises(ConfigError, match="repeat a timestep"):
        timestep_sequence(1000, 60, "quadratic")


def test_evaluator_default_spacing_reaches_t0():
    from bench.eval.spec import DEFAULTS

    assert timestep_sequence(1000, DEFAULTS["sampler_steps"], DEFAULTS["timestep_spacing"])[-1] == 0


def test_the_schedule_is_moved_to_the_device_once_per_call(linear):
    """The tables x0_hat and eps_hat read are put on the model's device once per sample() call, not
    at every step (on a GPU each such move of a float64 [T] table is a host-to-device copy)."""
    from torch.overrides import TorchFunctionMode

    class Moves(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and args[0].shape == (linear.T,) and (
                    "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])):
                Moves.count += 1
            return func(*args, **kwargs)

    m = GaussianOptimum(linear, kind="eps")
    with Moves():
        moved = sample(m, linear, "eps", 10, (1, 4, 4), batch_size=4, sampler="ddpm", steps=7)
    assert Moves.count == 2  # sqrt(ab) and sqrt(1 - ab), for 3 batches of 7 steps
    # The same images as the schedule's own per-step arithmetic gives, bit for bit.
    from bench.eval.sampling import schedule_on

    x, t, out = torch.randn(3, 1, 4, 4), torch.tensor([0, 500, 999]), torch.randn(3, 1, 4, 4)
    for kind in ("eps", "x0", "v"):
        for a, b in zip(schedule_on(linear, "cpu").predict_x0_eps(kind, x, t, out), linear.predict_x0_eps(kind, x, t, out)):
            assert torch.equal(a, b)
    assert torch.equal(moved, sample(m, linear, "eps", 10, (1, 4, 4), batch_size=10, sampler="ddpm", steps=7))


class OOMAbove(nn.Module):
    """A model that runs out of CUDA memory on batches of more than `most` images."""

    def __init__(self, inner, most):
        super().__init__()
        self.inner, self.most = inner, most

    def forward(self, x, *rest):
        if x.shape[0] > self.most:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated: {x.shape[0]} > {self.most} images)")
        return self.inner(x, *rest)


@pytest.mark.parametrize("cfg", [dict(sampler="ddim", steps=5), dict(sampler="ddpm", steps=5)])
def test_a_batch_out_of_memory_is_halved_and_gives_the_same_images(linear, cfg):
    full = sample(GaussianOptimum(linear), linear, "eps", 10, (1, 4, 4), batch_size=10, noise_seed=3, **cfg)
    halvings = []
    halved = sample(OOMAbove(GaussianOptimum(linear), 3), linear, "eps", 10, (1, 4, 4), batch_size=10, noise_seed=3,
                    on_halve=lambda old, new: halvings.append((old, new)), **cfg)
    assert halvings == [(10, 5), (5, 2)]
    assert torch.equal(halved, full)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one image that does not fit is not hidden
        sample(OOMAbove(GaussianOptimum(linear), 0), linear, "eps", 2, (1, 4, 4), batch_size=2, **cfg)


def test_the_evaluation_batch_is_sized_to_fit_adm_at_128px_on_80gb():
    """ADM at 128 px, class-conditional: the activation estimate (on the meta device, nothing
    allocated) puts the suite's 500-image batch above what 80 GB hold beside the weights, EMA and
    AdamW's moments, and the batch chosen fits there; a smaller network keeps the requested batch."""
    from bench.eval.sampling import activation_bytes, fit_batch
    from bench.models.networks import build_model

    with torch.device("meta"):
        adm = build_model("adm-unet", 3, 128, num_classes=1000)
    weights = 4 * sum(p.numel() for p in adm.parameters())
    per_image = activation_bytes(adm, (3, 128, 128), num_classes=1000)
    # At least the 256-channel 128x128 feature maps that stay alive for the skip connections (3 of them
    # at the top level, 16 MiB each in fp32), at most every one of the network's 1,000-odd tensors.
    assert 3 * 256 * 128 * 128 * 4 < per_image < 2**30
    free = 80 * 10**9 - 4 * weights  # weights, EMA and AdamW's two moments stay on the GPU while it samples
    assert 500 * per_image > 0.85 * free  # the suite's batch as it stands does not fit
    b = fit_batch(500, per_image, free)
    assert 100 <= b < 500 and b * per_image <= 0.85 * free
    # Guidance runs two forwards per image; a small network's requested batch fits as asked.
    assert activation_bytes(adm, (3, 128, 128), 1000, guidance_scale=1.5) > 1.5 * per_image
    tiny = build_model("unet-tiny", 1, 16)
    assert fit_batch(500, activation_bytes(tiny, (1, 16, 16)), free) == 500
