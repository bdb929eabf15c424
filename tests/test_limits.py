"""Issue 30, inputs at their limits: non-finite numbers and seeds past torch's range in a suite and on
the command line, a plugin that exits or names no method, repeated KEY=VALUE options, a suite name too
long for a folder, damaged or swapped EMA snapshots and a stale post-hoc EMA, and a killed
`consistency`. Each bad input gets one `error:` line and leaves nothing written (in-process `main`,
no clock)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from bench.cli import main
from bench.core.diffusion import make_schedule
from bench.core.registry import get_method
from bench.core.spec import Method, Param, raw_loss_weights_at, timestep_probs_at
from bench.errors import HyperparameterError, MethodOutputError
from bench.suite.grid import load_suite
from bench.suite.schema import SuiteError
from bench.train.loop import TrainConfig, train

SUITE = """
[suite]
name = "limits"

[grid]
methods = ["baseline"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0]

[budget]
iters = 2
batch_size = 2

[train]
lr = 1e-3

[eval]
every = 2
metrics = ["proxy_fd"]
"""


def one_line_error(capsys, argv, needle):
    """main(argv) exits 2 with one line on stderr, the `error:` line, which contains `needle`."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    return err


def suite_file(tmp_path, old="", new=""):
    assert old in SUITE
    path = tmp_path / "limits.toml"
    path.write_text(SUITE.replace(old, new, 1))
    return path


# -- numbers at their limits -------------------------------------------------------------------------

NON_FINITE = [
    ("lr = 1e-3", "lr = inf", "'train.lr'", "must be a finite number, got inf; give a finite number"),
    ("lr = 1e-3", "lr = nan", "'train.lr'", "must be a finite number, got nan"),
    ("lr = 1e-3", "lr = 1e400", "'train.lr'", "must be a finite number, got inf"),  # TOML reads 1e400 as inf
    ("lr = 1e-3", "lr = 1e-3\ngrad_clip = inf", "'train.grad_clip'", "grad_clip = 0 turns clipping off"),
    ("batch_size = 2", "batch_size = 2\nbaseline_extend = inf", "'budget.baseline_extend'", "finite"),
    ('metrics = ["proxy_fd"]', 'metrics = ["proxy_fd"]\neta = nan', "'eval.eta'", "finite"),
    ('methods = ["baseline"]', 'methods = ["baseline", {name = "min_snr", gamma = inf}]', "'grid.methods[1]'",
     "gamma=inf is out of range; allowed: float in (0, inf)"),
    ("seeds = [0]", "seeds = [0, 4294967296]", "'grid.seeds[1]'", "4294967296 is not in [0, 4294967295]"),
    ("seeds = [0]", "seeds = [1180591620717411303424]", "'grid.seeds[0]'", "is not in [0, 4294967295]"),
]


@pytest.mark.parametrize("old,new,key,reason", NON_FINITE, ids=[n for _, n, _, _ in NON_FINITE])
def test_numbers_past_their_limits_in_a_suite_are_refused_when_it_is_read(tmp_path, capsys, old, new, key, reason):
    """Without the checks, each of these passed the suite's check and every run then failed (config.json
    stores inf as null; torch.manual_seed overflows): now one line, before any folder."""
    path = suite_file(tmp_path, old, new)
    with pytest.raises(SuiteError, match="finite|range|not in") as info:
        load_suite(path)
    assert key in str(info.value) and reason in str(info.value)
    results = tmp_path / "results"
    one_line_error(capsys, ["--results", str(results), "run", str(path), "--dry-run"], reason)
    assert not results.exists()


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "nan"])
def test_describe_refuses_a_hyperparameter_outside_its_own_open_range(capsys, value):
    """min_snr's gamma is in (0, inf): inf lies on the open bound, 1e400 reads as inf."""
    one_line_error(capsys, ["describe", "min_snr", "--set", f"gamma={value}"], f"gamma={value} is")


def test_a_missing_bound_is_open_and_a_closed_infinite_one_still_refuses_inf():
    low_only = Param(1.0, low=0.0)  # [0, inf): inf is outside
    with pytest.raises(HyperparameterError, match=r"x=inf is out of range; allowed: float in \[0, inf\)"):
        low_only.parse("m", "x", "inf")
    assert low_only.parse("m", "x", "1e300") == 1e300
    with pytest.raises(HyperparameterError, match="x=-inf is out of range"):
        Param(1.0, high=2.0).parse("m", "x", float("-inf"))
    with pytest.raises(HyperparameterError, match="out of range"):  # config.json could not store it
        Param(1.0, low=0.0, high=float("inf")).parse("m", "x", float("inf"))


@pytest.mark.parametrize("argv,needle", [
    (["--seed", "4294967296"], "seed=4294967296 must be <= 4294967295"),
    (["--seed", str(2**70)], f"seed={2**70} must be <="),
    (["--seed", "-1"], "seed=-1 must be >= 0"),
    (["--lr", "inf"], "key 'lr' must be a finite number, got inf"),
    (["--lr", "nan"], "key 'lr' must be a finite number"),
], ids=["2**32", "2**70", "negative", "lr inf", "lr nan"])
def test_train_refuses_a_seed_or_number_past_its_limits_before_any_folder(tmp_path, capsys, argv, needle):
    run = tmp_path / "run"
    one_line_error(capsys, ["train", "--dataset", "synthetic", "--arch", "unet-micro", "--iters", "2", "--out", str(run),
                            *argv], needle)
    assert not run.exists()


def test_the_largest_seed_trains_torch_and_the_derived_streams_accept_it():
    """MAX_SEED is not arbitrary: every seed the training derives from it fits torch's generator."""
    from bench.core.config import MAX_SEED

    for derived in (MAX_SEED, MAX_SEED * 1_000_003 + 404 + 1024, MAX_SEED * 1_000_003 + 10**9):  # rank, epoch
        torch.Generator().manual_seed(derived)
    assert TrainConfig.from_dict({"seed": MAX_SEED}).seed == MAX_SEED


# -- plugins -------------------------------------------------------------------------------------------


def test_a_plugin_that_calls_sys_exit_on_import_is_one_line_naming_it(tmp_path, capsys):
    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(3)\n")
    err = one_line_error(capsys, ["describe", "baseline", "--plugins", str(plugin)], "called sys.exit(3) on import")
    assert str(plugin) in err


def test_a_method_without_a_name_is_named_and_a_base_class_is_not(tmp_path, capsys):
    (tmp_path / "nameless").mkdir()
    plugin = tmp_path / "nameless" / "nameless.py"
    plugin.write_text("from bench.core.spec import Method\n\nclass Nameless(Method):\n    source = 'test'\n")
    err = one_line_error(capsys, ["--plugins", str(plugin), "list"], "class Nameless is a Method without a name")
    assert str(plugin) in err
    (tmp_path / "based").mkdir()
    based = tmp_path / "based" / "based.py"
    based.write_text("from bench.core.spec import Method\n\nclass Base(Method):\n    source = 'test'\n\n"
                     "class Named(Base):\n    name = 'limits_named'\n")
    assert main(["--plugins", str(based), "describe", "limits_named", "--json"]) == 0
    assert '"method": "limits_named"' in capsys.readouterr().out


class ListProbs(Method):
    name = "list_probs"
    slots = frozenset({"timesteps", "weighting"})

    def timestep_probs(self, p, schedule):
        return [1.0 / schedule.T] * schedule.T

    def loss_weights(self, t, p, schedule, target):
        return [1.0] * len(t)


def test_a_list_from_a_hook_is_named_as_a_list_not_as_shape_empty():
    schedule, method = make_schedule("cosine", 16), ListProbs()
    with pytest.raises(MethodOutputError, match=r"timestep_probs at progress 0 is a list, not a tensor of shape \(16,\)"):
        timestep_probs_at(method, 0.0, schedule)
    with pytest.raises(MethodOutputError, match=r"loss_weights at progress 0 is a list, not a tensor, for \(16,\)"):
        raw_loss_weights_at(method, torch.arange(16), 0.0, schedule, "eps")


# -- options and names ---------------------------------------------------------------------------------


def test_a_key_set_twice_is_refused(capsys):
    one_line_error(capsys, ["describe", "min_snr", "--set", "gamma=3", "--set", "gamma=4"],
                   "--set sets 'gamma' twice (gamma=3 and gamma=4); give it once")


def test_a_bad_slurm_option_names_slurm(tmp_path, capsys):
    err = one_line_error(capsys, ["--results", str(tmp_path / "r"), "run", str(suite_file(tmp_path)), "--dry-run",
                                  "--slurm", "garbage"], "--slurm 'garbage' is not KEY=VALUE; write e.g. --slurm ")
    assert "--set" not in err and not (tmp_path / "r").exists()


def test_a_suite_name_too_long_for_a_folder_fails_its_dry_run(tmp_path, capsys):
    path = suite_file(tmp_path, 'name = "limits"', f'name = "{"n" * 300}"')
    results = tmp_path / "results"
    one_line_error(capsys, ["--results", str(results), "run", str(path), "--dry-run"],
                   "'suite.name': is 300 characters long; a suite's name (its results folder) may have at most 100")
    assert not results.exists()
    assert load_suite(suite_file(tmp_path, 'name = "limits"', f'name = "{"n" * 100}"')).name == "n" * 100


# -- posthoc-ema ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A power_ema run with a snapshot of its tracked averages after each of its 4 updates (T = 8: the
    consistency command samples with min(50, T) steps)."""
    out = tmp_path_factory.mktemp("ema") / "run"
    train(TrainConfig(method="power_ema", method_params={"snapshot_every": 1}, dataset="synthetic", arch="unet-micro",
                      iters=4, batch_size=2, ckpt_every=2, schedule="cosine", T=8), out)
    return out


@pytest.fixture
def run(ema_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(ema_run, copy)
    return copy


def posthoc(run, step=None):
    return ["posthoc-ema", str(run), "--sigma-rel", "0.07", *(["--step", str(step)] if step else [])]


def snap(run, step):
    return run / "ema_snapshots" / f"{step:08d}.pt"


def test_posthoc_ema_on_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    one_line_error(capsys, posthoc(tmp_path / "nowhere"), "nowhere does not exist or is not a folder")


def test_a_truncated_snapshot_is_one_line_naming_it(run, capsys):
    data = snap(run, 3).read_bytes()
    snap(run, 3).write_bytes(data[:len(data) // 2])
    err = one_line_error(capsys, posthoc(run), "is unreadable")
    assert str(snap(run, 3)) in err and not (run / "ema_posthoc").exists()


def test_a_snapshot_swapped_for_another_step_is_detected(run, capsys):
    a, b = snap(run, 2), snap(run, 4)
    a.rename(run / "x.tmp")
    b.rename(a)
    (run / "x.tmp").rename(b)
    err = one_line_error(capsys, posthoc(run), "holds step 4, not the step its name says")
    assert str(a) in err and not (run / "ema_posthoc").exists()


def test_a_snapshot_of_another_run_is_detected(run, capsys):
    other = torch.load(snap(run, 2), weights_only=True)
    other["averages"] = [{"w": torch.zeros(3)} for _ in other["averages"]]  # another network's tensors
    torch.save(other, snap(run, 2))
    one_line_error(capsys, posthoc(run), "tracks other widths or tensors than 00000001.pt")


def test_an_existing_reconstruction_is_kept_while_its_snapshots_are_and_rebuilt_when_one_changed(run, capsys):
    power_ema = sys.modules[type(get_method("power_ema")).__module__]
    assert main(posthoc(run, 4)) == 0
    out = run / "ema_posthoc" / "sigma0.07-step00000004.pt"
    assert capsys.readouterr().out.strip() == str(out)
    first, mtime = torch.load(out, weights_only=True), out.stat().st_mtime_ns
    assert main(posthoc(run, 4)) == 0 and out.stat().st_mtime_ns == mtime  # unchanged: not redone
    # A snapshot replaced by a valid one of other values (its step still right): the output follows it.
    changed = torch.load(snap(run, 3), weights_only=True)
    changed["averages"] = [{k: v + 1.0 for k, v in a.items()} for a in changed["averages"]]
    torch.save(changed, snap(run, 3))
    capsys.readouterr()
    assert main(posthoc(run, 4)) == 0
    assert "was built from snapshots that changed since; rebuilding it" in capsys.readouterr().err
    rebuilt, want = torch.load(out, weights_only=True), power_ema.reconstruct(run, 0.07, 4)
    assert any(not torch.equal(rebuilt[k], first[k]) for k in want)
    for k, v in want.items():
        assert torch.equal(rebuilt[k], v)
    # A snapshot damaged after a build: one line, never the stale file.
    snap(run, 1).write_bytes(snap(run, 1).read_bytes()[:100])
    one_line_error(capsys, posthoc(run, 4), "is unreadable")


def test_snapshots_after_the_step_do_not_make_a_reconstruction_stale(run, capsys):
    assert main(posthoc(run, 2)) == 0
    out = run / "ema_posthoc" / "sigma0.07-step00000002.pt"
    mtime = out.stat().st_mtime_ns
    snap(run, 4).write_bytes(b"damaged, and not read for step 2")
    capsys.readouterr()
    assert main(posthoc(run, 2)) == 0 and out.stat().st_mtime_ns == mtime
    assert capsys.readouterr().out.strip() == str(out)


# -- a killed consistency --------------------------------------------------------------------------------


def consistency(runs, out):
    return ["consistency", *map(str, runs), "--out", str(out), "--num-images", "2", "--x0-images", "2",
            "--t-points", "2", "--grid-columns", "1", "--device", "cpu"]


def test_the_output_is_built_aside_and_moved_into_place(tmp_path):
    """staging_folder and move_into_place on files alone: a new folder arrives whole; an existing one gets
    each new file, loses the ones no longer made and keeps others; a dead command's staging is swept,
    a live one's kept."""
    from bench.tools.consistency import move_into_place, staging_folder

    out = tmp_path / "c" / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "c" / f".out.staging-{int(dead.stdout)}").mkdir(parents=True)  # a killed command's
    (tmp_path / "c" / f".out.staging-{os.getppid()}").mkdir()  # a command still running (pytest's parent)
    staging = staging_folder(out)
    assert {p.name for p in out.parent.iterdir()} == {f".out.staging-{os.getpid()}", f".out.staging-{os.getppid()}"}
    (staging / "tables").mkdir()
    (staging / "tables" / "pairs.csv").write_text("new")
    (staging / "report.md").write_text("new")
    move_into_place(staging, out, gone=[])
    assert not staging.exists() and (out / "report.md").read_text() == "new"
    (out / "tables" / "over_t.csv").write_text("old")
    (out / "notes.txt").write_text("the user's")
    staging = staging_folder(out)
    (staging / "report.md").write_text("newer")
    move_into_place(staging, out, gone=["tables/over_t.csv"])
    assert not staging.exists() and (out / "report.md").read_text() == "newer"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "notes.txt", "report.md", "tables/pairs.csv"]


@pytest.mark.slow
def test_a_killed_consistency_leaves_no_half_written_output(ema_run, tmp_path):
    """Killed (SIGKILL) while writing consistency.json: no output folder and no stray temporary; the
    next command builds the whole folder and removes what the killed one left."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for r in runs:
        shutil.copytree(ema_run, r)
    out = tmp_path / "c" / "out"
    env = {**os.environ, "DIFFBENCH_FAULT": "write:consistency.json"}
    killed = subprocess.run([sys.executable, "run_bench.py", *consistency(runs, out)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    assert main(consistency(runs, out)) == 0
    assert {p.name for p in out.parent.iterdir()} == {"out"}  # the killed command's staging folder is gone
    assert (out / "report.md").is_file() and (out / "consistency.json").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
    # Killed again, over a whole earlier output: that output stays whole, with no temporary in it.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    killed = subprocess.run([sys.executable, "run_bench.py", *consistency(runs, out)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
