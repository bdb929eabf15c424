"""Five methods as their authors' code computes them (issue 28, "methods as written"): each default checked
against the source's formula written out anew here in numpy (never the suite's own code), and each former
deviation still reachable as a named option. Sources: debiased, yuhuUSTC/Debias ``weight = 1/self.sqrt_snr``;
power_ema, EDM2's solve_posthoc_coefficients (``X / np.sum(X, axis=0)``); immiscible, one assignment over
every process's images and noise; SpeeD, ``np.gradient`` and ``n // 2 + 1`` primaries; REPA, encoder depth d
read after block d (``blocks[d - 1]``) and a teacher that is not the metric's network."""

import hashlib
import itertools
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.core.diffusion import make_schedule
from bench.core.registry import get_method
from bench.core.spec import loss_weights_at, raw_loss_weights_at, sample_timesteps_at, timestep_probs_at
from bench.eval import proxy as P

T = 1000
HANG_S = 600  # only catches a hang of a spawned process; nothing below is timed


def alphas_bar(name: str) -> np.ndarray:
    """alpha_bar_t of the DDPM linear schedule or the cosine one (Nichol & Dhariwal, s = 0.008, beta <= 0.999),
    computed here from their definitions (float64)."""
    if name == "linear":
        return np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))


def module_of(name: str):
    return sys.modules[type(get_method(name)).__module__]


# -- debiased ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sched", ["linear", "cosine"])
def test_debiased_weight_is_one_over_sqrt_snr_with_no_clamp(sched):
    """The source: weight = 1 / sqrt_snr, sqrt_snr = sqrt(alpha_bar / (1 - alpha_bar)), at every t; after the
    harness's normalisation, that divided by its mean under uniform t. At t = 0 (SNR about 1e4 linear, 2.4e4
    cosine) the weight is its smallest and finite; the third-party clamp (snr_clamp=1000) makes it 3.16x
    (linear) or 4.9x (cosine) the source's there."""
    ab = alphas_bar(sched)
    source = 1 / np.sqrt(ab / (1 - ab))
    schedule, t = make_schedule(sched, T), torch.arange(T)
    np.testing.assert_allclose(schedule.alphas_bar.numpy(), ab, rtol=1e-12)  # the same schedule as written here
    method = get_method("debiased")
    raw = raw_loss_weights_at(method, t, 0.0, schedule, "eps").numpy()
    np.testing.assert_allclose(raw, source, rtol=1e-12)  # float64 throughout: a few ulps
    np.testing.assert_allclose(loss_weights_at(method, t, 0.0, schedule, "eps").numpy(), source / source.mean(),
                               rtol=1e-12)
    assert np.isfinite(raw[0]) and raw[0] == raw.min()
    clamped = raw_loss_weights_at(get_method("debiased", {"snr_clamp": 1000.0}), t, 0.0, schedule, "eps").numpy()
    np.testing.assert_allclose(clamped, 1 / np.sqrt(np.minimum(ab / (1 - ab), 1000.0)), rtol=1e-12)
    assert clamped[0] / source[0] == pytest.approx({"linear": 3.16, "cosine": 4.92}[sched], abs=0.01)


# -- power_ema ---------------------------------------------------------------------------------------


def power_ema_profile(sigma_rel: float, length: int) -> np.ndarray:
    """The weight of each of `length` updates in a power EMA of relative width sigma_rel read after the last,
    by running the average on unit impulses: beta_s = (1 - 1/s)^(gamma + 1), gamma the root of
    sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1 (found by bisection here)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3))) > sigma_rel else (lo, mid)
    gamma, e = (lo + hi) / 2, np.zeros(length)
    for s in range(1, length + 1):
        beta = (1 - 1 / s) ** (gamma + 1)
        e = beta * e + (1 - beta) * np.eye(length)[s - 1]
    return e


def edm2_coefficients(snapshots, sigma_rel: float, step: int) -> np.ndarray:
    """EDM2's solve_posthoc_coefficients on discrete profiles: A_ij = <profile_i, profile_j>, B_i = <profile_i,
    target>, X = solve(A, B), then X / sum(X)."""
    length = max([step] + [s for s, _ in snapshots])
    cols = [np.pad(power_ema_profile(sr, s), (0, length - s)) for s, sr in snapshots]
    target = np.pad(power_ema_profile(sigma_rel, step), (0, length - step))
    A = np.array([[ci @ cj for cj in cols] for ci in cols])
    X = np.linalg.solve(A, np.array([ci @ target for ci in cols]))
    return X / X.sum()


def test_power_ema_posthoc_coefficients_are_rescaled_to_sum_to_one_as_edm2_does(tmp_path):
    """Snapshots of widths 0.05 and 0.10 every 20 of 120 updates; reconstructions of 0.15 and 0.2 at 120. The
    coefficients equal EDM2's (closed form and its rescaling, written here; the normal equations of 12 nearly
    collinear profiles lose digits, so compared by the profile they combine to and by their sum). A constant
    parameter comes back as itself to float32 rounding; rescale=False (the former reading) is off by more."""
    power_ema = module_of("power_ema")
    snaps = [(st, s) for st in range(20, 121, 20) for s in (0.05, 0.10)]
    length = 120
    cols = np.stack([np.pad(power_ema_profile(sr, s), (0, length - s)) for s, sr in snaps], axis=1)
    for sigma_rel in (0.15, 0.2):
        got, want = power_ema.coefficients(snaps, sigma_rel, 120), edm2_coefficients(snaps, sigma_rel, 120)
        assert got.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(cols @ got, cols @ want, atol=1e-6)  # profile values are <= 0.2
        raw = power_ema.coefficients(snaps, sigma_rel, 120, rescale=False)
        assert abs(raw.sum() - 1) > 1e-4  # the former reading: not a weighted average

    # A constant network saved in every snapshot: the reconstruction is that constant.
    folder = tmp_path / "ema_snapshots"
    folder.mkdir()
    const = {"w": torch.full((3, 2), 0.75), "b": torch.full((3,), -2.5)}
    for st in range(20, 121, 20):
        torch.save({"step": st, "sigma_rels": [0.05, 0.10], "averages": [const, const]}, folder / f"{st:08d}.pt")
    for sigma_rel in (0.15, 0.2):
        out = power_ema.reconstruct(tmp_path, sigma_rel, 120)
        for k, v in const.items():  # a float64 sum of 12 terms rounded once to float32: within one float32 ulp
            np.testing.assert_allclose(out[k].numpy(), v.numpy(), rtol=2.0 ** -23)
    old = power_ema.reconstruct(tmp_path, 0.2, 120, rescale=False)
    assert abs(float(old["w"][0, 0]) - 0.75) > 1e-5


# -- immiscible ----------------------------------------------------------------------------------------


def brute_force(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The assignment (image i -> noise perm[i]) of least total L2 distance, over all permutations."""
    dist = np.linalg.norm(x[:, None, :] - e[None, :, :], axis=2)
    perms = list(itertools.permutations(range(len(x))))
    return np.array(perms[int(np.argmin([sum(dist[i, p[i]] for i in range(len(x))) for p in perms]))])


def immiscible_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 1, 2, generator=g) * 2 - 1, torch.randn(n, 1, 1, 2, generator=g)


def test_immiscible_solves_one_assignment_over_the_global_batch():
    """A global batch of 6 over 2 processes (3 each): each process's noise is its images' share of the
    brute-force optimum over all 6 (the source's gather-solve-scatter), so the two shares together are the
    one-process result; per process (scope="process", the former reading) each share is its own optimum,
    a different and worse assignment on this batch."""
    immiscible = module_of("immiscible")
    x0, eps = immiscible_batch(6, 3)
    x, e = x0.double().numpy().reshape(6, -1), eps.double().numpy().reshape(6, -1)
    best = brute_force(x, e)
    shares = [immiscible.share_of_global(x0, eps, rank, 2) for rank in range(2)]
    for rank in range(2):
        assert torch.equal(shares[rank], eps[torch.from_numpy(best[3 * rank:3 * rank + 3])])
    assert torch.equal(torch.cat(shares), get_method("immiscible").assign_noise(x0, eps))  # one process
    local = [get_method("immiscible", {"scope": "process"}).assign_noise(x0[s], eps[s]) for s in (slice(0, 3),
                                                                                                  slice(3, 6))]
    for rank, s in enumerate((slice(0, 3), slice(3, 6))):
        assert torch.equal(local[rank], eps[s][torch.from_numpy(brute_force(x[s], e[s]))])

    def total(noise):
        return float(np.linalg.norm(x - noise.double().numpy().reshape(6, -1), axis=1).sum())

    assert total(torch.cat(shares)) < total(torch.cat(local)) - 1e-3


def _immiscible_process(rank: int, world: int, rendezvous: str, scope: str, out: str) -> None:
    """One of `world` gloo processes: its share of the global batch through assign_noise, saved to `out`."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        x0, eps = immiscible_batch(8, 11)
        b = 8 // world
        got = get_method("immiscible", {"scope": scope}).assign_noise(x0[rank * b:(rank + 1) * b],
                                                                      eps[rank * b:(rank + 1) * b])
        torch.save(got, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "process"])
def test_immiscible_across_two_gloo_processes(tmp_path, scope):
    """Two real processes (gloo, rendezvous in a file of this test's own folder): with the default scope the
    noise does not depend on the process count (the two shares are the one-process assignment, bit for bit);
    with scope="process" each share is matched alone, as a one-process call on that share."""
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [ctx.Process(target=_immiscible_process, args=(r, 2, str(tmp_path / "rendezvous"), scope, str(outs[r])))
             for r in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(HANG_S)
            assert p.exitcode == 0, p.exitcode
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    got = torch.cat([torch.load(o, weights_only=True) for o in outs])
    x0, eps = immiscible_batch(8, 11)
    if scope == "global":
        want = get_method("immiscible").assign_noise(x0, eps)
    else:
        want = torch.cat([get_method("immiscible").assign_noise(x0[s], eps[s]) for s in (slice(0, 4), slice(4, 8))])
    assert torch.equal(got, want)
    # and this batch tells the two apart: the other scope's assignment differs
    other = (torch.cat([get_method("immiscible").assign_noise(x0[s], eps[s]) for s in (slice(0, 4), slice(4, 8))])
             if scope == "global" else get_method("immiscible").assign_noise(x0, eps))
    assert not torch.equal(got, other)


# -- SpeeD ---------------------------------------------------------------------------------------------


def speed_source(ab: np.ndarray, k=2.0, lam=0.6, tau=700, threshold=1e-4):
    """The source's numbers: t_m = argmax(np.gradient(sqrt(1 - ab)) < threshold) + 1; p proportional to k
    below tau and 1 above; weights k' + (1 - 2 k') gn below tau (k' = 1 - lam, gn the min-max normalised
    np.gradient(1 - ab)) and 1 above."""
    tm = int(np.argmax(np.gradient(np.sqrt(1 - ab)) < threshold)) + 1
    p = np.array([k] * tau + [1.0] * (T - tau))
    g = np.gradient(1 - ab)
    gn = (g - g.min()) / (g.max() - g.min())
    w = np.concatenate([((1 - lam) + (1 - 2 * (1 - lam)) * gn)[:tau], np.ones(T - tau)])
    return tm, p / p.sum(), w


@pytest.mark.parametrize("sched", ["linear", "cosine"])
def test_speed_t_m_and_weights_use_central_differences(sched):
    """t_m and the change-aware weight from np.gradient (642 on the linear schedule); the weights against the
    source's at every t. differences="backward" (the former reading) gives other weights."""
    ab = alphas_bar(sched)
    tm, _, w = speed_source(ab)
    method, schedule, t = get_method("speed"), make_schedule(sched, T), torch.arange(T)
    assert method.t_m(schedule) == tm
    if sched == "linear":
        assert tm == 642
    np.testing.assert_allclose(raw_loss_weights_at(method, t, 0.0, schedule, "eps").numpy(), w, rtol=1e-9)
    # The former reading: backward differences ((1 - ab)[-1] = 0), and t_m the first t where
    # sqrt(1 - ab)[t] - sqrt(1 - ab)[t - 1] < 1e-4; other weights than the source's.
    former = get_method("speed", {"differences": "backward"})
    g = np.diff(1 - ab, prepend=0.0)
    gn = (g - g.min()) / (g.max() - g.min())
    want = np.where(np.arange(T) < 700, 0.4 + 0.2 * gn, 1.0)
    backward = raw_loss_weights_at(former, t, 0.0, schedule, "eps").numpy()
    np.testing.assert_allclose(backward, want, rtol=1e-9)
    assert np.abs(backward - w).max() > 1e-4  # float64 rounding is ~1e-16 of these
    assert former.t_m(schedule) == 1 + int(np.argmax(np.diff(np.sqrt(1 - ab)) < 1e-4))


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 64])
def test_speed_draws_n_half_plus_one_primaries_then_their_duals(n):
    """A batch of n: n//2 + 1 primaries t_a (inverse CDF of p, written here with np.searchsorted) and the
    first n of [t_a, |t_a - t_m|]; primaries="half" keeps the former ceil(n / 2)."""
    ab = alphas_bar("linear")
    tm, p, _ = speed_source(ab)
    u = np.random.default_rng(n).random(n)
    cdf = np.cumsum(p)
    primaries = np.minimum(np.searchsorted(cdf, u[:n // 2 + 1] * cdf[-1], side="right"), T - 1)
    want = np.concatenate([primaries, np.abs(primaries - tm)])[:n]
    schedule = make_schedule("linear", T)
    got = sample_timesteps_at(get_method("speed"), u, 0.5, schedule).numpy()
    np.testing.assert_array_equal(got, want)
    half = sample_timesteps_at(get_method("speed", {"primaries": "half"}), u, 0.5, schedule).numpy()
    m = (n + 1) // 2
    np.testing.assert_array_equal(half[m:], np.abs(half[:n - m] - tm))
    np.testing.assert_allclose(timestep_probs_at(get_method("speed", {"dual": False}), 0.5, schedule).numpy(), p,
                               rtol=1e-12)


# -- REPA ----------------------------------------------------------------------------------------------


class Blocks(torch.nn.Module):
    """A transformer's shape only: `depth` blocks, block i adds 10^i (so each block's output is told apart)."""

    def __init__(self, depth: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Add(10.0 ** i) for i in range(depth))


class Add(torch.nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


def test_repa_default_layer_is_the_output_of_the_encoder_depths_block():
    """The source reads the hidden state where (i + 1) == encoder_depth in its loop over the blocks: depth 8
    on SiT-XL/2's 28 blocks, the output of blocks[7]. The default layer is the module whose output that is."""
    repa = module_of("repa")
    model, x = Blocks(28), torch.zeros(1)
    seen = None
    for i, block in enumerate(model.blocks):  # the source's loop
        x = block(x)
        if (i + 1) == 8:
            seen = x.clone()
    layer = repa.default_layer(model)
    caught = {}
    dict(model.named_modules())[layer].register_forward_hook(lambda _m, _i, out: caught.setdefault("out", out))
    x = torch.zeros(1)
    for block in model.blocks:
        x = block(x)
    assert layer == "blocks.7" and torch.equal(caught["out"], seen)
    assert [repa.default_layer(Blocks(n)) for n in (12, 24)] == ["blocks.2", "blocks.6"]  # 8/28 of the depth


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def quick_classifiers(tmp_path, monkeypatch):
    """A cache of this test's own, nothing in memory, and classifiers trained for one epoch (what is checked is
    which network is which, not how well it classifies)."""
    real = P.train_proxy
    monkeypatch.setattr(P, "_LOADED", {})
    monkeypatch.setattr(P, "train_proxy", lambda *a, **kw: real(*a, **{**kw, "epochs": 1}))
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "eval" / "proxy"


def test_repa_teacher_is_not_the_metric_network_and_a_run_records_it(tmp_path, quick_classifiers):
    """At 8 px (no shipped classifier) both the metric's and the teacher are trained here: the teacher has its
    own seed and its own file, its weights are not the metric's, and a 2-step run records its name and the
    SHA-256 of its cached file in method_trace.json ("aux" -> "teacher"). teacher="metric" is the former
    default: then the record names the metric's own classifier."""
    from bench.models.networks import build_model
    from bench.train.loop import TrainConfig, train

    model = build_model("unet-micro", 1, 8)
    aux = get_method("repa", {"proj_dim": 8}).build_aux(model, (1, 8, 8), "synthetic", None)
    metric = P.get_proxy("synthetic", 8)
    record = aux.record["teacher"]
    assert record["role"] == "separate" and record["name"] == "synthetic-cnn-v1-r8-teacher"
    assert record["weights_sha256"] != metric.weights_sha256 and record["seed"] != metric.info["seed"]
    assert digest(aux.module.teacher) != digest(metric.model.body[:-2])
    files = sorted(f.name for f in quick_classifiers.glob("*.pt"))
    assert files == ["synthetic-cnn-v1-r8-seed0.pt", "synthetic-cnn-v1-r8-teacher-seed1000.pt"]
    on_disk = hashlib.sha256((quick_classifiers / files[1]).read_bytes()).hexdigest()
    assert record["weights_sha256"] == on_disk

    cfg = TrainConfig(dataset="synthetic", resolution=8, arch="unet-micro", method="repa",
                      method_params={"proj_dim": 8}, iters=2, batch_size=2, warmup=0)
    assert train(cfg, tmp_path / "run")["state"] == "done"
    trace = json.loads((tmp_path / "run" / "method_trace.json").read_text())
    assert trace["aux"]["teacher"]["weights_sha256"] == on_disk
    assert trace["aux"]["teacher"]["name"] == "synthetic-cnn-v1-r8-teacher"

    former = get_method("repa", {"proj_dim": 8, "teacher": "metric"}).build_aux(model, (1, 8, 8), "synthetic", None)
    assert former.record["teacher"]["weights_sha256"] == metric.weights_sha256
    assert digest(former.module.teacher) == digest(metric.model.body[:-2])
    assert Path(quick_classifiers / files[0]).is_file()
