"""Suite files (bench/suite/grid.py): the shipped suites, the grid, validation errors, the dry-run plan."""

import re
from pathlib import Path

import pytest
import torch

from bench.core.eval_steps import eval_steps
from bench.errors import ConfigError
from bench.suite.cost import describe_plan, estimate_cost, run_cost
from bench.suite.grid import available_suites, load_suite
from bench.suite.schema import SuiteError, parse_slurm_time

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["mini", "smoke", "paper-cifar10", "ablation-clts", "ablation-mdlrc", "cpu-reference", "cpu-reference-pilot",
           "comparison", "cpu-workloads"]

VALID = """
[suite]
name = "t"

[grid]
methods = ["baseline", {name = "min_snr", gamma = 3}]
datasets = ["synthetic"]
archs = ["unet-tiny"]
seeds = [0, 1]

[budget]
iters = 10
batch_size = 4

[train]
lr = 1e-3

[eval]
every = 5
metrics = ["proxy_fd"]
num_images = 16
"""


def write(tmp_path, text, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_suites_load_and_validate(name):
    suite = load_suite(name)
    assert suite.name == name
    runs = suite.runs()
    assert len(runs) == len(suite.methods) * len(suite.workloads) * len(suite.seeds)
    assert len({r.key for r in runs}) == len(runs)
    # One budget per workload: equal images seen for every method (an extended baseline trains past it).
    for w in suite.workloads:
        images = {(r.config.get("budget_iters") or r.config["iters"]) * r.config["batch_size"]
                  for r in runs if r.workload == w.name}
        assert len(images) == 1
    assert suite.report["baseline"] == "baseline"
    assert set(available_suites()) >= set(SHIPPED)


def test_mini_is_the_cpu_default():
    s = load_suite("mini")
    assert [m.label for m in s.methods] == ["baseline", "p2", "min_snr", "clts", "mdlrc", "combined", "placebo"]
    assert [w.name for w in s.workloads] == ["fashion-mnist-12_unet-micro"]
    assert len(s.seeds) >= 4  # paired t-intervals need >= 3; 4 leaves one seed of slack
    assert s.baseline_extend >= 2 and s.eval["noise_sets"] >= 3
    assert len(eval_steps(s.baseline_iters, s.eval_every)) >= 4
    assert s.eval["metrics"][0] == "proxy_fd" and s.report["metric"] == "proxy_fd"
    assert s.eval["sampler_steps"] <= 20 and s.eval["num_images"] <= 512
    # The sampler reaches t = 0 and visits the low-noise steps P2 and Min-SNR down-weight.
    from bench.eval.sampling import timestep_sequence

    ts = timestep_sequence(1000, s.eval["sampler_steps"], s.eval["timestep_spacing"])
    assert ts[-1] == 0 and sum(t < 100 for t in ts) >= 3
    assert s.train["ema_warmup"] is True and s.report["headline"] in s.report["targets"]


def test_paper_cifar10_matches_methods_md():
    s = load_suite("paper-cifar10")
    cfg = s.runs()[0].config
    assert (cfg["dataset"], cfg["resolution"], cfg["arch"], cfg["flip"]) == ("cifar10", 32, "ddpm-unet", True)
    assert (cfg["lr"], cfg["warmup"], cfg["grad_clip"], cfg["batch_size"], cfg["ema_decay"], cfg["iters"]) == \
        (2e-4, 5000, 1.0, 128, 0.9999, 800_000)
    assert (cfg["schedule"], cfg["T"], cfg["target"], cfg["weight_decay"]) == ("linear", 1000, "eps", 0.0)
    assert cfg["eval"]["metrics"] == ["fid"] and cfg["eval"]["num_images"] == 50_000
    assert {m.name for m in s.methods} == {"baseline", "p2", "min_snr", "clts", "mdlrc", "combined", "speed", "edm",
                                           "logit_normal", "soft_min_snr", "debiased", "loss_aware", "immiscible",
                                           "repa", "power_ema"}
    assert s.slurm["partition"] and s.slurm["gpus"] == 1 and parse_slurm_time(s.slurm["time"]) == 48 * 60


def test_ablations_cover_their_hyperparameters():
    clts = load_suite("ablation-clts")
    varied = {k for m in clts.methods for k in m.params}
    assert {"mu", "sigma", "ramp"} <= varied
    mdlrc = load_suite("ablation-mdlrc")
    assert {"beta1_end", "compensation"} <= {k for m in mdlrc.methods for k in m.params}
    rules = {m.params.get("compensation", "variance") for m in mdlrc.methods if m.name == "mdlrc"}
    assert rules == {"none", "variance", "demon"}
    assert "baseline" in {m.label for m in clts.methods} & {m.label for m in mdlrc.methods}


def test_grid_layout_labels_and_configs(tmp_path):
    s = load_suite(write(tmp_path, VALID))
    runs = s.runs()
    assert [r.key for r in runs] == [
        "synthetic-16_unet-tiny/baseline/seed0", "synthetic-16_unet-tiny/min_snr-gamma3/seed0",
        "synthetic-16_unet-tiny/baseline/seed1", "synthetic-16_unet-tiny/min_snr-gamma3/seed1"]
    r = runs[1]
    assert r.run_dir("results") == Path("results/t/synthetic-16_unet-tiny/min_snr-gamma3/seed0")
    assert r.config["method"] == "min_snr" and r.config["method_params"] == {"gamma": 3.0}
    assert isinstance(r.config["method_params"]["gamma"], float)  # typed as the method parses it
    assert r.config["eval_every"] == 5 and r.config["eval"] == {"metrics": ["proxy_fd"], "num_images": 16}
    assert r.config["lr"] == 1e-3 and r.config["seed"] == 0 and r.config["resolution"] is None
    # A shared dict is never mutated through a run's config.
    r.config["eval"]["num_images"] = 1
    assert s.eval["num_images"] == 16



def test_plugin_paths_are_relative_to_the_suite_file(tmp_path, isolated_registry):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "halfweight.py").write_text(
        "import torch\nfrom bench.core.spec import Method\n\n\n"
        "class HalfWeight(Method):\n    name = 'halfweight'\n    slots = frozenset({'weighting'})\n\n"
        "    def loss_weights(self, t, p, schedule, target):\n"
        "        return torch.full(t.shape, 0.5, dtype=torch.float64)\n")
    text = VALID.replace('"baseline", {', '"baseline", "halfweight", {').replace(
        "lr = 1e-3", 'lr = 1e-3\nplugins = ["plugins/halfweight.py"]')
    s = load_suite(write(tmp_path, text))
    assert [m.label for m in s.methods] == ["baseline", "halfweight", "min_snr-gamma3"]
    assert s.runs()[0].config["plugins"] == [str(tmp_path / "plugins" / "halfweight.py")]


def test_reference_study_and_mdlrc_controls_on_minis_workload():
    """cpu-reference: mini's workload past the bend, 8 paired seeds, the six methods, the placebo and
    MDLRC's two controls; ablation-mdlrc has the controls on mini's workload and budget too."""
    mini, ref, abl = load_suite("mini"), load_suite("cpu-reference"), load_suite("ablation-mdlrc")
    assert [w.name for w in ref.workloads] == [w.name for w in abl.workloads] == [w.name for w in mini.workloads]
    for key in ("lr", "warmup", "grad_clip", "ema_decay", "ema_warmup", "schedule", "target"):
        assert ref.train[key] == mini.train[key] == abl.train[key], key
    assert ref.batch_size == mini.batch_size == abl.batch_size and abl.iters == mini.iters
    assert len(ref.seeds) == 8 and ref.baseline_extend >= 2 and ref.eval["noise_sets"] >= 3
    assert ref.eval["sampler2"] == {"sampler": "ddim", "sampler_steps": 50, "timestep_spacing": "linspace"}
    labels = [m.label for m in ref.methods]
    assert set(labels) >= {"baseline", "p2", "min_snr", "clts", "mdlrc", "combined", "placebo", "lr_control",
                           "mdlrc-compensationnone"}
    assert {"lr_control", "mdlrc-compensationnone", "mdlrc"} <= {m.label for m in abl.methods}


def test_baseline_extend_trains_the_baseline_on(tmp_path):
    s = load_suite(write(tmp_path, VALID.replace("batch_size = 4", "batch_size = 4\nbaseline_extend = 2.5")))
    its = {r.label: (r.config["iters"], r.config.get("budget_iters", 0)) for r in s.runs()}
    assert its == {"baseline": (25, 10), "min_snr-gamma3": (10, 0)}
    assert s.to_dict()["budget"]["baseline_extend"] == 2.5 and s.to_dict()["budget"]["baseline_iters"] == 25
    assert eval_steps(25, 5, 10) == [5, 10, 15, 20, 25]
    assert eval_steps(25, 4, 10) == [4, 8, 10, 12, 16, 20, 24, 25]  # the budget is always evaluated
    bad = write(tmp_path, VALID.replace("batch_size = 4", "batch_size = 4\nbaseline_extend = 0.5"), "bad.toml")
    with pytest.raises(SuiteError, match="budget.baseline_extend.*must be >= 1"):
        load_suite(bad)
    own = write(tmp_path, VALID.replace("lr = 1e-3", "lr = 1e-3\nbudget_iters = 3"), "own.toml")
    with pytest.raises(SuiteError, match="train.budget_iters.*baseline_extend"):
        load_suite(own)


def test_default_report_settings(tmp_path):
    s = load_suite(write(tmp_path, VALID))
    assert s.report["metric"] == "proxy_fd" and s.report["baseline"] == "baseline"
    assert s.report["fractions"] == [0.25, 0.5, 0.75, 1.0]
    no_base = VALID.replace('"baseline", ', "")
    assert load_suite(write(tmp_path, no_base, "nb.toml")).baseline is None


BAD = [
    # (replace this, with this, key named in the message, reason fragment)
    ('[suite]', '[suit]\n[suite]', "'suit'", "unknown table"),
    ('num_images = 16', 'num_images = 16\nnum_imgs = 3', "'eval.num_imgs'", "unknown key in [eval]"),
    ('iters = 10', 'iters = "10"', "'budget.iters'", "must be an integer"),
    ('iters = 10', 'iters = 0', "'budget.iters'", "must be > 0"),
    ('iters = 10\n', '', "'budget.iters'", "missing"),
    ('"baseline", {', '"baseline", "nosuch", {', "'grid.methods[1]'", "unknown method 'nosuch'"),
    ('gamma = 3', 'gamma = -1.0', "'grid.methods[1]'", "out of range"),
    ('gamma = 3', 'gama = 3.0', "'grid.methods[1]'", "no hyperparameter 'gama'"),
    ('gamma = 3', 'gamma = "big"', "'grid.methods[1]'", "gamma"),
    ('{name = "min_snr", gamma = 3}', '{gamma = 3.0}', "'grid.methods[1]'", "needs name"),
    ('{name = "min_snr", gamma = 3}', '"baseline"', "'grid.methods[1]'", "already in the grid"),
    ('seeds = [0, 1]', 'seeds = [0, 0]', "'grid.seeds'", "repeats a seed"),
    ('seeds = [0, 1]', 'seeds = []', "'grid.seeds'", "must not be empty"),
    ('seeds = [0, 1]', 'seeds = [0, 1.5]', "'grid.seeds'", "a list of integers"),
    ('datasets = ["synthetic"]', 'datasets = ["nosuch"]', "'grid.datasets[0].name'", "unknown dataset"),
    ('datasets = ["synthetic"]', 'datasets = [{name = "synthetic", res = 8}]', "'grid.datasets[0].res'",
     "unknown key"),
    ('lr = 1e-3', 'lr = 1e-3\nlearning_rate = 1', "'train.learning_rate'", "unknown training setting"),
    ('lr = 1e-3', 'lr = 1e-3\niters = 5', "'train.iters'", "set by [budget]"),
    ('lr = 1e-3', 'lr = "fast"', "train.lr", "must be float"),
    ('lr = 1e-3', 'lr = -1.0', "lr=-1.0", "must be > 0"),
    ('lr = 1e-3', 'p_uncond = 0.1', "'train.p_uncond'", "set class_cond = true"),
    ('lr = 1e-3', 'p_uncond = 0.1\nclass_cond = "yes"', "'train.class_cond'", "must be bool"),
    ('lr = 1e-3', 'gpus = 3', "'train.gpus'", "batch_size=4 is not divisible by gpus=3"),
    ('lr = 1e-3', 'lr = 1e-3\ngpus = 2\ndevice = "cuda:0"', "key 'train':", "device='cuda:0' names one GPU"),
    ('num_images = 16', 'num_images = 16\n[report]\nmetric = "fid"', "'report.metric'",
     "not among [eval] metrics"),
    ('num_images = 16', 'num_images = 16\n[report]\nbaseline = "p2"', "'report.baseline'",
     "not a method label"),
    ('num_images = 16', 'num_images = 16\n[slurm]\ntime = "soon"', "'slurm.time'",
     "not a Slurm time"),
    ('num_images = 16', 'num_images = 16\n[slurm]\ngpu = 1', "'slurm.gpu'", "unknown key"),
    ('[budget]', '[budget]\nx = [', "", "not valid TOML"),
    ('num_images = 16', 'num_images = 16\nsampler_steps = 2000', "'eval'", "1..1000"),
    ('num_images = 16', 'num_images = 16\nsampler = "euler"', "'eval'", "unknown sampler 'euler'"),
    ('num_images = 16', 'num_images = 16\nnoise_seed = "x"', "'eval.noise_seed'", "must be an integer"),
    ('num_images = 16', 'num_images = 16\ndataset = "cifar10"', "'eval.dataset'", "set by [grid] datasets"),
    ('num_images = 16', 'num_images = 16\nnoise_sets = 0', "'eval'", "noise_sets must be an integer >= 1"),
    ('num_images = 16', 'num_images = 16\nsampler2 = { sampler = "euler" }', "'eval'", "sampler2: unknown sampler"),
    ('num_images = 16', 'num_images = 16\nsampler2 = { steps = 50 }', "'eval'", "sampler2 has unknown key 'steps'"),
    ('num_images = 16', 'num_images = 16\nsampler2 = 50', "'eval'", "sampler2 must be a table"),
    ('archs = ["unet-tiny"]', 'archs = ["unet-huge"]', "'grid.archs'", "unknown architecture 'unet-huge'"),
    ('[budget]', '[log]\nto = "mlflow"\n[budget]', "'log.to'", 'must be "tensorboard" or "wandb"'),
    ('datasets = ["synthetic"]\narchs = ["unet-tiny"]', 'datasets = [{name = "synthetic", resolution = 18}]\n'
     'archs = ["dit-s/4"]', "'grid.archs'", "divisible by its patch size 4; got 18"),
]


@pytest.mark.parametrize("old,new,key,reason", BAD, ids=[b[3] + " " + b[2] for b in BAD])
def test_invalid_suites_name_file_key_and_reason(tmp_path, old, new, key, reason):
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1), "bad.toml")
    with pytest.raises(SuiteError, match=rf"^{re.escape(str(path))}: .*{re.escape(key)}.*{re.escape(reason)}") as info:
        load_suite(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert key in msg, msg
    assert reason in msg, msg
    assert "\n" not in msg.strip() or "not valid TOML" in msg
    assert isinstance(info.value, ConfigError)


def test_a_binary_suite_file_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(SuiteError, match=rf"^{re.escape(str(path))}: not a text file \(byte 0 is not UTF-8\)"):
        load_suite(path)


def test_unknown_suite_name_lists_the_shipped_ones():
    with pytest.raises(SuiteError, match="unknown suite 'nosuch'.*mini"):
        load_suite("nosuch")
    with pytest.raises(SuiteError, match="no such suite file"):
        load_suite("/nonexistent/x.toml")


def test_one_evaluation_rule_for_training_runner_and_cost():
    from bench.core.eval_steps import evaluates, is_eval_step

    for iters, every in ((600, 150), (10, 4), (10, 0), (7, 7), (5, 9)):
        assert eval_steps(iters, every) == [s for s in range(1, iters + 1) if is_eval_step(s, iters, every)]
    assert not evaluates({}, 0) and evaluates({}, 5) and evaluates({"metrics": ["proxy_fd"]}, 0)
    # The cost model counts no evaluation for a run without one, and the end for eval_every = 0.
    s = load_suite("smoke")
    run = s.runs()[1]  # clts, seed 0 (runs()[0] is the extended baseline: 4 evaluation points)
    assert run.label == "clts" and run_cost(s, run).eval_points == 2
    assert run_cost(s, s.runs()[0]).eval_points == 4
    bare = type(run)(run.suite, run.workload, run.label, run.seed, {**run.config, "eval": {}, "eval_every": 0})
    assert run_cost(s, bare).eval_points == 0
    only_end = type(run)(run.suite, run.workload, run.label, run.seed, {**run.config, "eval_every": 0})
    assert run_cost(s, only_end).eval_points == 1
    # An [eval] table that leaves num_images and sampler_steps out gets the evaluator's defaults.
    defaults = type(run)(run.suite, run.workload, run.label, run.seed, {**run.config, "eval": {"metrics": ["fid"]}})
    c = run_cost(s, defaults)
    assert (c.sample_images, c.network_evals) == (2 * 1000, 2 * 1000 * 25)


def test_eval_steps_and_slurm_time():
    assert eval_steps(600, 150) == [150, 300, 450, 600]
    assert eval_steps(10, 4) == [4, 8, 10]
    assert eval_steps(10, 0) == [10]
    assert parse_slurm_time(90) == 90
    assert parse_slurm_time("90") == 90
    assert parse_slurm_time("01:30:00") == 90
    assert parse_slurm_time("1-00:00:00") == 1440
    assert parse_slurm_time("10:30") == 11  # MM:SS rounds up
    with pytest.raises(ValueError, match=r"^'tomorrow' is not a Slurm time \(minutes, HH:MM:SS or D-HH:MM:SS\)$"):
        parse_slurm_time("tomorrow")


def test_cost_estimate_by_hand():
    s = load_suite("smoke")
    est = estimate_cost(s)
    _, c = est.runs[0]
    # The extended baseline: 16 iterations x batch 8 = 128 images at 450 img/s; evaluations at 4, 8,
    # 12 and 16, each the mean of 2 noise sets of 32 images with 2 sampler steps (256 images, 512
    # network evaluations), plus the second sampler at the budget (32 images x 3 steps = 96):
    # 608 network evaluations at 450 x 2.5 per second; 3 s startup + 4 x 1 s (smoke.toml sets
    # train_images_per_s 450 and startup_s 3; forward_ratio and eval_overhead_s are the defaults).
    assert (c.train_images, c.eval_points, c.sample_images, c.network_evals) == (128, 4, 288, 608)
    assert c.train_s == pytest.approx(128 / 450)
    assert c.sample_s == pytest.approx(608 / (450 * 2.5))
    assert c.overhead_s == pytest.approx(7.0)
    # clts and placebo: 64 images; evaluations at 4 (one set) and 8 (two sets, and the second
    # sampler): 96 + 32 = 128 images, 96 x 2 + 32 x 3 = 288 network evaluations.
    _, m = est.runs[1]
    assert (m.train_images, m.eval_points, m.sample_images, m.network_evals) == (64, 2, 128, 288)
    others = 2 * (len(s.methods) - 1)  # every other method's two seeds cost what clts's do
    assert est.train_images == 2 * 128 + others * 64 and est.sample_images == 2 * 288 + others * 128
    # Plus the one-time evaluator setup of 5 s.
    assert est.setup_s == 5.0
    assert est.total_s == pytest.approx(2 * (128 / 450 + 608 / 1125 + 7) + others * (64 / 450 + 288 / 1125 + 5) + 5)


def test_guided_sampling_costs_two_network_evaluations_per_step(tmp_path):
    from bench.suite.cost import run_cost

    text = VALID.replace("lr = 1e-3", "lr = 1e-3\nclass_cond = true\np_uncond = 0.1").replace(
        "num_images = 16", "num_images = 16\nsampler_steps = 5")
    plain = load_suite(write(tmp_path, text, "plain.toml"))
    guided = load_suite(write(tmp_path, text.replace("sampler_steps = 5", "sampler_steps = 5\nguidance_scale = 2.0"),
                              "guided.toml"))
    n_plain, n_guided = (run_cost(s, s.runs()[0]).network_evals for s in (plain, guided))
    assert n_plain == 2 * 16 * 5 and n_guided == 2 * n_plain


def test_plan_lists_every_run_and_the_totals():
    s = load_suite("smoke")
    text = describe_plan(s, {s.runs()[0].key: "done"}, jobs=2)
    for r in s.runs():
        assert r.key in text
    others = 2 * (len(s.methods) - 1)
    assert "done" in text and f"images to train: {2 * 128 + others * 64:,}" in text
    assert f"images to sample: {2 * 288 + others * 128:,}" in text
    assert "estimated time" in text and "2 parallel jobs" in text


def test_lr_sweep_adds_baseline_runs_at_each_learning_rate(tmp_path):
    text = VALID.replace("seeds = [0, 1]", "seeds = [0, 1]\nlr_sweep = [3e-4, 1e-3, 3e-3]")
    s = load_suite(write(tmp_path, text))
    # The shared lr (1e-3) is the baseline itself: no duplicate entry.
    assert [m.label for m in s.methods] == ["baseline", "min_snr-gamma3", "baseline-lr0.0003", "baseline-lr0.003"]
    lrs = {r.label: r.config["lr"] for r in s.runs()}
    assert lrs == {"baseline": 1e-3, "min_snr-gamma3": 1e-3, "baseline-lr0.0003": 3e-4, "baseline-lr0.003": 3e-3}
    assert {r.config["method"] for r in s.runs() if r.label.startswith("baseline")} == {"baseline"}
    assert s.to_dict()["lr_sweep"] == {"baseline": 1e-3, "baseline-lr0.0003": 3e-4, "baseline-lr0.003": 3e-3}
    bad = write(tmp_path, VALID.replace("seeds = [0, 1]", "seeds = [0, 1]\nlr_sweep = [-1.0]"), "bad.toml")
    with pytest.raises(SuiteError, match="grid.lr_sweep"):
        load_suite(bad)


def test_headline_must_be_one_of_the_targets(tmp_path):
    text = VALID + "\n[report]\ntargets = [0.5, 1.0]\nheadline = 0.75\n"
    with pytest.raises(SuiteError, match="report.headline.*not among report.targets"):
        load_suite(write(tmp_path, text))
    ok = load_suite(write(tmp_path, VALID + "\n[report]\ntargets = [1.0, 0.5]\nheadline = 0.5\n", "ok.toml"))
    assert ok.report["targets"] == [0.5, 1.0] and ok.report["headline"] == 0.5


def test_train_settings_are_checked_together_with_the_suites_other_values(tmp_path):
    """p_uncond needs class_cond, gpus must divide the budget's batch: a suite that sets both keys
    (not the defaults) loads."""
    text = VALID.replace("lr = 1e-3", "lr = 1e-3\nclass_cond = true\np_uncond = 0.1\ngpus = 2")
    suite = load_suite(write(tmp_path, text, "ok.toml"))
    config = suite.runs()[0].config
    assert config["class_cond"] and config["p_uncond"] == 0.1 and config["gpus"] == 2 and config["batch_size"] == 4


def test_the_cost_model_prices_paper_imagenet128s_evaluation_within_2x_of_a_flop_count():
    """Counted here: adm-unet's forward FLOPs at 128 px (class-conditional, torch's FLOP counter on the
    meta device) x every network evaluation the suite's plan makes (FID-10k at 8 points and FID-50k
    at the end, DDIM 100), at the suite's bf16 peak x utilization x 8 GPUs; plus Inception's published
    5.7 G multiply-adds per image in fp32. The dry run's evaluation hours must be within 2x of it,
    and shown apart from training's."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models.networks import build_model

    s = load_suite("paper-imagenet128")
    run = s.runs()[0]
    c = run_cost(s, run)
    with torch.device("meta"):
        net = build_model("adm-unet", 3, 128, num_classes=1000)
        with FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 3, 128, 128), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    images = 8 * 10_000 + 50_000
    assert c.sample_images == images and c.network_evals == images * 100
    tflops, use = s.cost["device_tflops"], s.cost["utilization"]
    counted = (images * 100 * counter.get_total_flops() / (tflops["bf16"] * 1e12 * use * 8)
               + images * 2 * 5.7e9 / (tflops["fp32"] * 1e12 * use * 8))
    assert 0.5 < c.eval_s / counted < 2.0
    assert c.eval_s < 0.5 * c.train_s  # a fraction of training, not the 80x under-pricing of a training rate
    text = describe_plan(s)
    assert "(training 112.4 days, evaluation " in text  # 15 methods (the field's 9 beside the paper's 6) x 3 seeds and re.search(r"\btrain +eval +est. time\n", text)


def test_the_comparison_suite_lists_every_registered_method():
    from bench.core.registry import load_plugins

    s = load_suite("comparison")
    assert {m.name for m in s.methods} == set(load_plugins())
    assert len(s.seeds) >= 3 and s.report["baseline"] == "baseline"
