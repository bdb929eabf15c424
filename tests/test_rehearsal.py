"""The rehearsal of a suite (`run SUITE --rehearse`, bench/suite/rehearse.py and rehearse_plan.py): the GPU suites as shipped,
end to end on the CPU with only sizes shrunk, through the user's commands; and its parts: the plan keeps
every relation between image counts, the environment shrinks networks and a job's compute limit in every
process, and bad uses are refused in one line.

The three rehearsals are the slow tier (minutes each: real Inception features); the rest is quick."""

import json
import os
import subprocess
import sys

import pytest
import tomllib
from conftest import REPO, needs_inception

from bench.cli import main
from bench.suite.rehearse import rehearse
from bench.suite.rehearse_plan import ARCH_ENV, LIMIT_ENV, REAL_SPLITS, plan_rehearsal, to_toml

GPU_SUITES = ["paper-cifar10", "paper-imagenet128", "archs-cifar10"]


def plan_of(name: str, tmp_path):
    path = REPO / "suites" / f"{name}.toml"
    return plan_rehearsal(tomllib.loads(path.read_text()), path, tmp_path / "work")


@pytest.mark.parametrize("name", GPU_SUITES)
def test_the_plan_shrinks_sizes_and_keeps_every_relation(name, tmp_path, monkeypatch):
    from bench.models.networks import count_parameters
    from bench.suite.grid import load_suite

    shipped = tomllib.loads((REPO / "suites" / f"{name}.toml").read_text())
    plan = plan_of(name, tmp_path)
    assert plan.broken == [], plan.broken
    # What decides which code runs is the shipped suite's: methods, architectures, metrics, the
    # reference, the conditioning, the [cost] and [slurm] tables.
    for table, key in (("grid", "methods"), ("grid", "archs"), ("eval", "metrics"), ("eval", "ref_split"),
                       ("train", "class_cond"), ("eval", "sample_precision")):
        assert plan.data[table].get(key) == shipped[table].get(key), key
    assert plan.data["cost"] == shipped["cost"] and plan.data["eval"]["num_ref"] == "all"
    ev, budget = plan.data["eval"], plan.data["budget"]
    assert (budget["iters"], ev["every"]) == (4, 1)  # the report's fractions 0.25 ... 1 are evaluation steps
    assert ev.get("final_num_images", 0) > ev["num_images"] or "final_num_images" not in shipped["eval"]
    # Every process takes part in the evaluation, as each of 8 GPUs does.
    assert ev["num_images"] >= plan.data["train"].get("gpus", 1) >= 1
    # The data is generated in the real layout; imagenet128 still has no test split.
    (dataset, where, small), = plan.datasets
    assert set(small) == set(REAL_SPLITS[dataset]) and ("test" in small) == (dataset == "cifar10")
    assert plan.data["grid"]["datasets"][0]["data_dir"] == str(where)

    # The file a user's commands read: the shrunk tables exactly, loadable as a suite.
    toml = tmp_path / "s.toml"
    toml.write_text(to_toml(plan.data, plan.changes))
    suite = load_suite(toml)
    assert len(suite.runs()) == len(shipped["grid"]["methods"]) * len(shipped["grid"]["archs"])
    # Smaller networks of the same architectures, in every process that reads the environment.
    for arch in shipped["grid"]["archs"]:
        full = count_parameters(arch, 3, 32)
        monkeypatch.setenv(ARCH_ENV, plan.env[ARCH_ENV])
        assert count_parameters(arch, 3, 32) < full / 50
        monkeypatch.delenv(ARCH_ENV)


def test_the_relations_say_what_the_real_suite_does(tmp_path):
    """paper-cifar10's FID-50k is more than its 10,000 test images and all of its training images; a job
    computes features of at most 10,000 images; imagenet128 has no test split."""
    cifar = "\n".join(plan_of("paper-cifar10", tmp_path).relations)
    assert "N vs its test split: 3 > 2 (real: 50,000 > 10,000)" in cifar
    assert "N vs a training job's compute limit: 3 > 2 (real: 50,000 > 10,000)" in cifar
    assert "the reference is all of the train split" in cifar
    imagenet = plan_of("paper-imagenet128", tmp_path)
    text = "\n".join(imagenet.relations)
    assert "imagenet128: no test split (as the real)" in text
    assert "final N vs a training job's compute limit: 3 > 2 (real: 50,000 > 10,000)" in text
    assert "N vs processes (every process samples): 2 = 2 (real: 8 = 8)" in text
    assert imagenet.data["train"]["gpus"] == 2 and imagenet.data["budget"]["batch_size"] == 4


def test_a_relation_the_shrink_would_break_is_flagged(tmp_path):
    """A reference of part of a split (num_ref = 20,000 of CIFAR10's 50,000) leaves real images for the
    noise floor of N = 10,000 in the split itself, but not for the final N = 50,000; the shrunk split keeps
    its least size for REPA's teacher, so the second relation changes, and the plan says so rather than
    rehearsing another path silently."""
    path = REPO / "suites" / "archs-cifar10.toml"
    data = tomllib.loads(path.read_text())
    data["eval"]["num_ref"] = 20_000
    plan = plan_rehearsal(data, path, tmp_path)
    assert plan.broken == ["cifar10: reference + final N vs its train split: 7 < 145 (real: 70,000 > 50,000)  NOT KEPT"]
    assert "cifar10: reference + N vs its train split: 5 < 145 (real: 30,000 < 50,000)" in plan.relations


def test_the_environment_reaches_a_fresh_process(tmp_path):
    """What the rehearsal sets for its processes: each one builds the smaller network and refuses to
    compute more reference features than the scaled limit (bench.train.loop reads it at import)."""
    code = ("import json; from bench.models.networks import build_model; from bench.train import loop; "
            "m = build_model('ddpm-unet', 3, 32); print(json.dumps([m.conv_in.out_channels, loop.TRAIN_COMPUTE_LIMIT]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), ARCH_ENV: json.dumps({"ddpm-unet": {"ch": 16, "groups": 8}}),
           LIMIT_ENV: "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [16, 2], out.stderr[-2000:]


def test_a_failed_stage_is_told_by_its_most_telling_line():
    from bench.suite.rehearse import telling_line

    table = ["suite s-rehearsal: 0/15 done, 15 failed", "results in /r/s-re", "hearsal"]  # a wrapped last line
    assert telling_line(["start a", *table]) == table[0]
    assert telling_line(["Traceback ...", "NameError: Unknown argument 'max_num_timeout'", *table]).startswith("NameError")
    assert telling_line(["error: ref-stats: no such suite", "NameError: x"]) == "error: ref-stats: no such suite"
    assert telling_line([]) == "(no output)"


@pytest.mark.parametrize("extra", [["--jobs", "2"], ["--executor", "submitit-local"], ["--dry-run"]])
def test_rehearse_refuses_options_of_its_own_commands(tmp_path, capsys, extra):
    assert main(["--results", str(tmp_path), "run", "paper-cifar10", "--rehearse", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --rehearse") and extra[0] in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_rehearsal_is_never_overwritten(tmp_path, capsys):
    earlier = tmp_path / "paper-cifar10-rehearsal"
    earlier.mkdir()
    (earlier / "kept").write_text("x")
    assert main(["--results", str(tmp_path), "run", "paper-cifar10", "--rehearse"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier rehearsal" in err and f"rm -r {earlier}" in err
    assert [p.name for p in earlier.iterdir()] == ["kept"]


@pytest.mark.slow
@needs_inception  # real FID, as on the GPU
@pytest.mark.parametrize("name", GPU_SUITES)
def test_a_gpu_suite_rehearses_end_to_end(name, tmp_path):
    """The rehearsal passes: the dry run of the suite as shipped, the data prepared as a user prepares
    it, ref-stats, one Slurm job (submitit's local executor) timed out and requeued, run (gpus = N as
    gloo processes), report; every method of the grid done, REPA included."""
    lines = []

    def say(line):
        lines.append(line)
        print(line)  # the whole rehearsal in the test's captured output

    rc = rehearse(name, tmp_path / "results", say=say)
    text = "\n".join(lines)
    assert rc == 0, text[-6000:]
    folder = tmp_path / "results" / f"{name}-rehearsal"
    report = (folder / "report.md").read_text()
    shipped = tomllib.loads((REPO / "suites" / f"{name}.toml").read_text())
    for method in shipped["grid"]["methods"]:
        assert f"`{method}`" in report or f"| {method} " in report, method
    evals = (folder / "tables" / "evaluations.csv").read_text()
    if "final_num_images" in shipped["eval"]:  # one number per run at the end: values, no speed-up
        assert "fid_final" in evals and "### fid_final: the end of the budget" in report
        assert "speed-up over `baseline` (fid_final)" not in report and "fid_final at fractions" not in report
    if name == "paper-imagenet128":
        assert "class-conditional, image i labelled i mod 8" in report
    for arch in shipped["grid"]["archs"]:
        assert arch.replace("/", "-") in report
