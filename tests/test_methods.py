"""Every method's timestep distribution, loss weights and optimizer settings against formulas
written out independently here (METHODS.md), through `describe`, the same code training uses."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from scipy import stats

from bench.core.describe import describe
from bench.core.diffusion import make_schedule
from bench.core.registry import get_method, load_plugins, method_label
from bench.errors import ConfigError, HyperparameterError, UnknownMethodError

T = 1000
SCHEDULES = [("linear", False), ("cosine", False), ("linear", True), ("cosine", True)]
TARGETS = ["eps", "x0", "v"]
PROGRESS = [0.0, 0.25, 0.5, 1.0]


def snr_np(name, zts):
    ab = make_schedule(name, T, zts).alphas_bar.numpy()
    return ab / (1 - ab)


def to_target(w_eps, snr, target):
    """Independent conversion: a weight on eps-MSE equals w_eps * SNR on x0-MSE and
    w_eps * SNR / (SNR + 1) on v-MSE, because ||x0 err||^2 = ||eps err||^2 / SNR and
    ||v err||^2 = ||eps err||^2 (SNR + 1) / SNR."""
    return {"eps": w_eps, "x0": w_eps * snr, "v": w_eps * snr / (snr + 1)}[target]


def expected_weights(name, params, snr, target, p):
    if name in ("baseline", "clts", "mdlrc", "combined"):
        return np.ones_like(snr)
    if name == "p2":
        return to_target(1.0 / (params.get("k", 1.0) + snr) ** params.get("gamma", 1.0), snr, target)
    if name == "min_snr":
        g = params.get("gamma", 5.0)
        w = {"x0": np.minimum(snr, g), "eps": None, "v": np.minimum(snr, g) / (snr + 1)}[target]
        if target == "eps":
            with np.errstate(divide="ignore", invalid="ignore"):
                w = np.minimum(snr, g) / snr
        return np.where(snr == 0, 1.0, w)
    raise AssertionError(name)


def expected_probs(name, params, p):
    if name not in ("clts", "combined"):
        return np.full(T, 1 / T)
    mu, sigma = params.get("mu", 0.3), params.get("sigma", 0.25)
    lam = params.get("lam_max", 1.0) * min(1.0, p / params.get("ramp", 1.0))
    g = np.exp(-((np.arange(T) / T - mu) ** 2) / (2 * sigma**2))
    return (1 - lam) / T + lam * g / g.sum()


def expected_optim(name, params, p):
    if name not in ("mdlrc", "combined"):
        return 1.0, 0.9
    b0, b1 = params.get("beta1_start", 0.9), params.get("beta1_end", 0.5)
    b = b0 + (b1 - b0) * min(1.0, p / params.get("ramp", 1.0))
    rule = params.get("compensation", "variance")
    c = {"variance": math.sqrt(((1 - b0) / (1 + b0)) / ((1 - b) / (1 + b))), "demon": (1 - b0) / (1 - b), "none": 1.0}[rule]
    return c, b


CASES = [("baseline", {}), ("p2", {}), ("p2", {"gamma": 0.5, "k": 2.0}), ("min_snr", {}), ("min_snr", {"gamma": 1.0}),
         ("clts", {}), ("clts", {"mu": 0.5, "sigma": 0.1, "ramp": 0.5, "lam_max": 0.8}),
         ("mdlrc", {}), ("mdlrc", {"compensation": "demon"}), ("mdlrc", {"compensation": "none", "beta1_end": 0.7}),
         ("combined", {})]


@pytest.mark.parametrize("name,params", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("schedule,zts", SCHEDULES)
@pytest.mark.parametrize("target", TARGETS)
def test_describe_matches_formulas(name, params, schedule, zts, target):
    method = get_method(name, params)
    sch = make_schedule(schedule, T, zts)
    snr = snr_np(schedule, zts)
    for p in PROGRESS:
        d = describe(method, p, sch, target)
        probs, w = np.array(d["timestep_probs"]), np.array(d["loss_weights"])
        assert len(probs) == T and len(w) == T
        assert np.all(np.isfinite(w)), f"non-finite weight (zero terminal SNR: {zts})"
        np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-12)
        np.testing.assert_allclose(probs, expected_probs(name, params, p), rtol=1e-9)
        np.testing.assert_allclose(w, expected_weights(name, params, snr, target, p), rtol=1e-9, atol=1e-300)
        lr_scale, beta1 = expected_optim(name, params, p)
        assert d["lr_scale"] == pytest.approx(lr_scale, rel=1e-12)
        assert d["beta1"] == pytest.approx(beta1, rel=1e-12)


def test_min_snr_is_not_the_speed_repo_formula():
    """The known peer defect computes gamma / (SNR + 1) for eps; ours is min(SNR, gamma) / SNR."""
    sch = make_schedule("linear", T)
    t = torch.tensor([10, 500, 990])
    w = get_method("min_snr").loss_weights(t, 0.0, sch, "eps").numpy()
    snr = sch.snr[t].numpy()
    assert w[0] == pytest.approx(5 / snr[0])  # high SNR: clamped
    assert w[2] == pytest.approx(1.0)  # low SNR: unclamped
    assert not np.allclose(w, 5 / (snr + 1))


def test_mdlrc_variance_rule_value_from_methods_md():
    d = describe(get_method("mdlrc"), 1.0, make_schedule(), "eps")
    assert d["lr_scale"] == pytest.approx(0.397, abs=5e-4)
    assert d["beta1"] == pytest.approx(0.5)


@pytest.mark.parametrize("rule", ["variance", "demon", "none"])
def test_mdlrc_over_progress(rule):
    m = get_method("mdlrc", {"compensation": rule, "ramp": 0.5})
    sch = make_schedule()
    betas = [describe(m, p, sch, "eps")["beta1"] for p in np.linspace(0, 1, 11)]
    scales = [describe(m, p, sch, "eps")["lr_scale"] for p in np.linspace(0, 1, 11)]
    assert betas[0] == pytest.approx(0.9) and betas[5] == pytest.approx(0.5) and betas[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    assert scales[0] == pytest.approx(1.0)
    if rule == "none":
        assert scales == pytest.approx([1.0] * 11)
    else:
        assert all(a >= b for a, b in zip(scales, scales[1:])) and scales[-1] < 1


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_clts_sampled_histogram_matches_distribution(p):
    """Draw t exactly as training does and compare with pi_p(t) by chi-square on 20 bins."""
    sch = make_schedule()
    probs = get_method("clts").timestep_probs(p, sch)
    g = torch.Generator().manual_seed(1234)
    n = 200_000
    t = torch.multinomial(probs.float(), n, replacement=True, generator=g).numpy()
    bins = np.arange(0, T + 1, 50)
    observed, _ = np.histogram(t, bins)
    expected = np.add.reduceat(expected_probs("clts", {}, p), bins[:-1]) * n
    _, pvalue = stats.chisquare(observed, expected)
    assert pvalue > 0.001
    # ... and the test has power: the histogram of p=0 is rejected against pi_1.
    if p == 1.0:
        uniform = np.full(len(bins) - 1, n / (len(bins) - 1))
        assert stats.chisquare(observed, uniform)[1] < 1e-10


def test_combined_composes_and_refuses_overlap():
    m = get_method("combined", {"parts": "clts+mdlrc", "clts.mu": 0.2, "mdlrc.compensation": "demon"})
    assert m.slots == {"timesteps", "optimizer"}
    assert m.label == "combined-clts.mu0.2-mdlrc.compensationdemon"
    d = describe(m, 1.0, make_schedule(), "eps")
    np.testing.assert_allclose(d["timestep_probs"], expected_probs("clts", {"mu": 0.2}, 1.0), rtol=1e-9)
    assert d["lr_scale"] == pytest.approx(expected_optim("mdlrc", {"compensation": "demon"}, 1.0)[0])
    m2 = get_method("combined", {"parts": "min_snr+clts"})
    assert m2.slots == {"weighting", "timesteps"}
    with pytest.raises(HyperparameterError, match="p2 and min_snr both fill the 'weighting' slot"):
        get_method("combined", {"parts": "p2+min_snr"})
    with pytest.raises(HyperparameterError, match="names part 'p2'"):
        get_method("combined", {"p2.gamma": 1})
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'"):
        get_method("combined", {"parts": "clts+nope"})


def test_labels_encode_non_default_hyperparameters():
    assert method_label("min_snr") == "min_snr"
    assert method_label("min_snr", {"gamma": 5}) == "min_snr"
    assert method_label("min_snr", {"gamma": "3"}) == "min_snr-gamma3"
    assert method_label("clts", {"sigma": 0.1, "mu": 0.25}) == "clts-mu0.25-sigma0.1"
    assert method_label("mdlrc", {"compensation": "none"}) != method_label("mdlrc", {"compensation": "demon"})


@pytest.mark.parametrize("name,params,match", [
    ("min_snr", {"gamma": 0}, r"method 'min_snr': hyperparameter gamma=0 is out of range; allowed: float in \(0, inf\)"),
    ("min_snr", {"gamma": "abc"}, "gamma=abc is not a valid float"),
    ("p2", {"k": -1}, "hyperparameter k=-1"),
    ("clts", {"mu": 1.5}, r"mu=1.5 is out of range; allowed: float in \[0, 1\]"),
    ("clts", {"sigma": 0}, "sigma=0"),
    ("mdlrc", {"compensation": "adam"}, "one of variance, demon, none"),
    ("mdlrc", {"beta1_end": 1.0}, "beta1_end=1.0 is out of range"),
    ("p2", {"alpha": 1}, "method 'p2' has no hyperparameter 'alpha'; its hyperparameters: gamma, k"),
])
def test_bad_hyperparameters(name, params, match):
    with pytest.raises(HyperparameterError, match=match):
        get_method(name, params)


def test_unknown_method_lists_known():
    with pytest.raises(UnknownMethodError, match=r"^unknown method 'fastdiff'; known methods: .*"
                                                 r"\(add your own with --plugins PATH\)$") as err:
        get_method("fastdiff")
    for known in ("baseline", "p2", "min_snr", "clts", "mdlrc", "combined"):
        assert known in str(err.value)


PLUGIN = '''
from bench.core.spec import Method, Param


class WarmEMA(Method):
    """EMA decay that grows with progress (test plugin)."""

    name = "warm_ema"
    slots = frozenset({"ema"})
    params = {"start": Param(0.9, low=0.0, high=1.0, high_open=True)}

    def ema_decay(self, p, base):
        return self.hp["start"] + (base - self.hp["start"]) * p
'''


def test_plugin_file_found_via_plugins(tmp_path):
    (tmp_path / "warm_ema.py").write_text(PLUGIN)
    registry = load_plugins([tmp_path])
    assert "warm_ema" in registry
    d = describe(get_method("warm_ema", {"start": 0.5}), 0.5, make_schedule(), "eps", ema_base=0.9)
    assert d["ema_decay"] == pytest.approx(0.7)
    # Through the command line, as a user would, in a fresh process.
    out = subprocess.run([sys.executable, "run_bench.py", "describe", "warm_ema", "--plugins", str(tmp_path),
                          "--progress", "1", "--json"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ema_decay"] == pytest.approx(0.999)  # TrainConfig's default EMA decay
    missing = subprocess.run([sys.executable, "run_bench.py", "describe", "warm_ema", "--json"], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "unknown method 'warm_ema'" in missing.stderr


def test_a_plugin_written_for_the_old_module_names_is_told_the_new_one(tmp_path):
    """bench/ moved into subpackages: a plugin that imports bench.spec gets one line naming bench.core.spec."""
    (tmp_path / "old.py").write_text(PLUGIN.replace("from bench.core.spec import", "from bench.spec import"))
    with pytest.raises(ConfigError, match=r"^plugin .*old\.py failed to import: ModuleNotFoundError: .*'bench\.spec'; "
                                          r"bench\.spec is now bench\.core\.spec: change the plugin's import$"):
        load_plugins([tmp_path])


def test_describe_cli_json_and_errors():
    out = subprocess.run([sys.executable, "run_bench.py", "describe", "combined", "--progress", "0.5", "--target", "v",
                          "--schedule", "cosine", "--json"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert len(d["timestep_probs"]) == T and abs(sum(d["timestep_probs"]) - 1) < 1e-9
    np.testing.assert_allclose(d["timestep_probs"], expected_probs("clts", {}, 0.5), rtol=1e-9)
    assert d["beta1"] == pytest.approx(0.7) and d["lr_scale"] == pytest.approx(expected_optim("mdlrc", {}, 0.5)[0])
    bad = subprocess.run([sys.executable, "run_bench.py", "describe", "min_snr", "--set", "gamma=-1"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "gamma=-1" in bad.stderr and "Traceback" not in bad.stderr


def test_lr_control_applies_mdlrc_lr_with_beta1_fixed():
    ctrl, mdlrc = get_method("lr_control"), get_method("mdlrc")
    assert ctrl.slots == frozenset({"optimizer"})
    for p in np.linspace(0, 1, 11):
        assert ctrl.optimizer(p).lr_scale == pytest.approx(mdlrc.optimizer(p).lr_scale)
        assert ctrl.optimizer(p).beta1 is None  # the configured beta1 stays
    # METHODS.md: "variance" over a linear 0.9 -> 0.5 ramp averages 0.59x and ends at 0.397x.
    ps = np.linspace(0, 1, 100001)
    mean = np.mean([ctrl.optimizer(p).lr_scale for p in ps])
    assert mean == pytest.approx(0.59, abs=0.005) and ctrl.optimizer(1.0).lr_scale == pytest.approx(0.397, abs=1e-3)
    demon = get_method("lr_control", {"compensation": "demon", "beta1_end": 0.7})
    assert demon.optimizer(1.0).lr_scale == pytest.approx((1 - 0.9) / (1 - 0.7))
    with pytest.raises(HyperparameterError, match="compensation"):
        get_method("lr_control", {"compensation": "none"})  # that would be the baseline


def test_ablation_mdlrc_has_its_controls():
    from bench.suite.grid import load_suite

    s = load_suite("ablation-mdlrc")
    entries = {(m.name, tuple(sorted(m.params.items()))) for m in s.methods}
    assert ("lr_control", ()) in entries and ("mdlrc", (("compensation", "none"),)) in entries


def test_a_hook_without_its_slot_is_refused_at_registration(tmp_path):
    (tmp_path / "sneaky.py").write_text(
        "import torch\nfrom bench.core.spec import Method\n\n"
        "class Sneaky(Method):\n    name = 'sneaky'\n    slots = frozenset({'timesteps'})\n\n"
        "    def loss_weights(self, t, p, schedule, target):\n"
        "        return torch.full(t.shape, 2.0, dtype=torch.float64)\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'sneaky.py'))}: method 'sneaky' overrides "
                                          r"loss_weights\(\) but does not declare the 'weighting' slot") as err:
        load_plugins([tmp_path / "sneaky.py"])
    with pytest.raises(ConfigError, match="overrides loss_weights"):  # refused again, never half-registered
        load_plugins([tmp_path / "sneaky.py"])
    msg = str(err.value)
    assert "\n" not in msg and "sneaky.py" in msg and "overrides loss_weights()" in msg and "'weighting'" in msg
    out = subprocess.run([sys.executable, "run_bench.py", "describe", "sneaky", "--plugins", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)  # catches a hang only
    assert out.returncode == 2 and out.stderr.startswith("error:") and "overrides loss_weights()" in out.stderr


def test_slot_dispatch_falls_back_to_the_baseline_for_undeclared_slots():
    from bench.core.spec import ema_decay_at, loss_weights_at, optimizer_settings_at, timestep_probs_at

    sch = make_schedule()
    clts, p2 = get_method("clts"), get_method("p2")
    t = torch.arange(0, 1000, 100)
    assert torch.equal(loss_weights_at(clts, t, 0.5, sch, "eps"), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(timestep_probs_at(p2, 0.5, sch), torch.full((1000,), 1e-3, dtype=torch.float64))
    assert optimizer_settings_at(p2, 0.5, 0.9, 0.99) == (1.0, 0.9, 0.99)
    assert ema_decay_at(clts, 0.5, 0.995, 3) == 0.995
    assert not torch.allclose(timestep_probs_at(clts, 1.0, sch), torch.full((1000,), 1e-3, dtype=torch.float64))
