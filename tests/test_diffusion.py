"""The diffusion core against formulas written out independently with numpy."""

import math

import numpy as np
import pytest
import torch

from bench.core.diffusion import make_schedule
from bench.errors import ConfigError


def np_alpha_bar(name, T, zero_terminal):
    if name == "linear":
        b = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
        ab = np.cumprod(1 - b)
    else:
        s = 0.008
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
        ab = np.cumprod(1 - b)
    if zero_terminal:
        r = np.sqrt(ab)
        r = (r - r[-1]) * r[0] / (r[0] - r[-1])
        ab = r**2
    return ab


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("zts", [False, True])
@pytest.mark.parametrize("T", [1000, 50])
def test_alpha_bar_matches_formula(name, zts, T):
    sch = make_schedule(name, T, zts)
    np.testing.assert_allclose(sch.alphas_bar.numpy(), np_alpha_bar(name, T, zts), rtol=1e-10, atol=1e-14)
    assert torch.all(sch.alphas_bar[1:] < sch.alphas_bar[:-1])


def test_zero_terminal_snr():
    base = make_schedule("linear", 1000)
    sch = make_schedule("linear", 1000, zero_terminal_snr=True)
    assert sch.snr[-1].item() == 0.0
    assert sch.alphas_bar[0].item() == pytest.approx(base.alphas_bar[0].item(), rel=1e-12)
    assert base.snr[-1].item() > 0
    assert torch.all(torch.isfinite(sch.snr))
    # betas reproduce alpha_bar, and the last beta is exactly 1
    np.testing.assert_allclose(torch.cumprod(1 - sch.betas, 0).numpy(), sch.alphas_bar.numpy(), atol=1e-12)
    assert sch.betas[-1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("zts", [False, True])
def test_targets_and_conversions(kind, zts):
    sch = make_schedule("cosine", 1000, zts)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 300, 700, 998, 999])
    x_t = sch.q_sample(x0, t, eps)
    ab = sch.alphas_bar[t].view(-1, 1, 1, 1)
    np.testing.assert_allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-12)
    expected_v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    target = sch.target(kind, x0, eps, t)
    np.testing.assert_allclose(target, {"eps": eps, "x0": x0, "v": expected_v}[kind], atol=1e-12)
    x0_hat, eps_hat = sch.predict_x0_eps(kind, x_t, t, target)
    # At a zero-terminal step x0 cannot be recovered from eps (and eps not from x0 at t = 0 is fine).
    ok = sch.alphas_bar[t] > 0 if kind == "eps" else torch.ones(6, dtype=torch.bool)
    np.testing.assert_allclose(x0_hat[ok], x0[ok], atol=1e-6)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-6)


def test_bad_schedule_names():
    with pytest.raises(ConfigError, match="unknown noise schedule 'quadratic'"):
        make_schedule("quadratic")
    with pytest.raises(ConfigError, match="unknown prediction target"):
        make_schedule().target("score", torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_a_linear_schedule_too_short_for_its_betas_is_refused(tmp_path):
    """beta_max = 0.02 x 1000 / T: at T = 16 it is 1.25 and every loss would be NaN; refused in one line."""
    with pytest.raises(ConfigError, match=r"^T=16 puts the linear schedule's largest beta at 1\.25 \(>= 1.*use T >= 21 "
                                          r"or the cosine schedule$"):
        make_schedule("linear", 16)
    assert make_schedule("linear", 21).betas.max() < 1 and make_schedule("cosine", 16).betas.max() < 1
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "run_bench.py", "train", "--dataset", "synthetic", "--arch", "unet-tiny",
                          "--T", "16", "--iters", "2", "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "T=16" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
