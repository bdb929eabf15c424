"""Evaluation inside training: on the EMA weights, at the right steps, never repeated or lost
across a resume, and reachable from the command line."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, needs_inception

from bench import fileio
from bench.eval.sampling import save_pngs
from bench.train.loop import TrainConfig, TrainEvents, train

EVAL = {"metrics": ["proxy_fd", "proxy_kid"], "num_images": 16, "num_ref": 64, "sampler_steps": 2, "batch_size": 16}
CFG = dict(dataset="synthetic", iters=12, batch_size=8, warmup=0, eval_every=4, ckpt_every=100, eval=EVAL)


def eval_rows(run_dir):
    return [(r["step"], r["metric"], r["value"]) for r in fileio.read_jsonl(run_dir / "evals.jsonl")]


def test_resumed_run_neither_repeats_nor_loses_evaluations(tmp_path):
    cfg = TrainConfig(method="clts", **CFG)
    train(cfg, tmp_path / "whole")

    class Killed(Exception):
        pass

    class Die(TrainEvents):
        def on_step(self, step, iters, row):
            if step == 10:  # after the evaluation (and checkpoint) at 8
                raise Killed("killed at step 10")

    with pytest.raises(Killed, match="^killed at step 10$"):
        train(cfg, tmp_path / "resumed", Die())
    assert [s for s, m, _ in eval_rows(tmp_path / "resumed") if m == "proxy_fd"] == [4, 8]
    train(cfg, tmp_path / "resumed")
    whole, resumed = eval_rows(tmp_path / "whole"), eval_rows(tmp_path / "resumed")
    assert [(s, m) for s, m, _ in resumed] == [(s, m) for s in (4, 8, 12) for m in ("proxy_fd", "proxy_kid")]
    assert resumed == whole  # same EMA weights, same fixed noise: the same numbers
    row = fileio.read_jsonl(tmp_path / "resumed" / "evals.jsonl")[0]
    assert row["num_gen"] == 16 and row["sampler"] == "ddim" and row["sampler_steps"] == 2
    assert row["feature_extractor"] and row["ref_split"] in ("train", "test") and row["num_ref"] == 64
    status = fileio.read_json(tmp_path / "resumed" / "status.json")
    assert status["eval_seconds"] > 0 and status["train_seconds"] > 0


def test_cli_train_eval_every_writes_curves(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run_bench.py", "train", "--method", "min_snr", "--dataset", "synthetic",
                           "--iters", "6", "--batch-size", "8", "--eval-every", "3", "--eval-metrics", "proxy_fd",
                           "--eval-images", "16", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = fileio.read_jsonl(out / "evals.jsonl")
    assert [(r["step"], r["metric"]) for r in rows] == [(3, "proxy_fd"), (6, "proxy_fd")]
    assert all(np.isfinite(r["value"]) and r["num_gen"] == 16 for r in rows)


@needs_inception
def test_cli_fid_of_two_folders(tmp_path, capsys):
    from bench.cli import main

    rng = np.random.default_rng(0)
    for name, shift in (("a", 0), ("b", 60)):
        images = torch.from_numpy(np.clip(rng.normal(100 + shift, 40, (5, 3, 32, 32)), 0, 255).astype(np.uint8))
        save_pngs(images, tmp_path / name)
    # In this process, as the user's command runs it (bench.cli.main): the CLI's process start is
    # covered by test_user_habits; here the numbers and the exit statuses.
    scores = []
    for a, b in (("a", "a"), ("a", "b")):
        assert main(["fid", str(tmp_path / a), str(tmp_path / b)]) == 0
        scores.append(float(capsys.readouterr().out.strip().splitlines()[-1]))
    assert abs(scores[0]) < 1e-3 and scores[1] > 1.0
    assert main(["fid", str(tmp_path / "nope"), str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_placebo_shares_initialisation_and_data_but_not_the_random_streams():
    from bench.core.registry import get_method
    from bench.train.batches import draw_batch
    from bench.train.loop import setup

    placebo = get_method("placebo")
    assert placebo.slots == {"streams"} and placebo.stream_seed(3) == 1_000_003
    assert get_method("placebo", {"offset": 2}).stream_seed(3) == 2_000_003
    cfg = TrainConfig(dataset="synthetic", iters=4, batch_size=8, flip=True)
    base, plac = setup(cfg, get_method("baseline")), setup(cfg, placebo)
    for a, b in zip(base.model.parameters(), plac.model.parameters()):
        assert torch.equal(a, b)  # the same initial weights
    for step in range(3):
        x, y = draw_batch(base, step), draw_batch(plac, step)
        assert torch.equal(x.images, y.images) and torch.equal(x.flip, y.flip)  # the same data order and flips
        assert not torch.equal(x.t_global, y.t_global) and not torch.equal(x.eps, y.eps)  # other timesteps and noise


def test_extended_baseline_evaluates_its_budget_with_noise_sets_and_the_second_sampler(tmp_path):
    spec = {**EVAL, "metrics": ["proxy_fd"], "noise_sets": 3,
            "sampler2": {"sampler": "ddim", "sampler_steps": 3, "timestep_spacing": "linspace"}}
    base = dict(CFG, eval=spec, eval_every=3)
    train(TrainConfig(method="baseline", **{**base, "iters": 12, "budget_iters": 5}), tmp_path / "ext")
    train(TrainConfig(method="baseline", **{**base, "iters": 5}), tmp_path / "plain")
    ext, plain = (fileio.read_jsonl(tmp_path / d / "evals.jsonl") for d in ("ext", "plain"))
    # The extended run evaluates every 3 iterations, at its end, and at the budget 5; each with 3 noise sets.
    assert [(r["step"], r["noise_sets"]) for r in ext if r["metric"] == "proxy_fd"] == \
        [(3, 3), (5, 3), (6, 3), (9, 3), (12, 3)]
    assert [r["step"] for r in ext if r["metric"] == "proxy_fd_sampler2"] == [5]
    # The run that stops at the budget: one set at 3, three at its end; the second sampler there.
    assert [(r["step"], r["noise_sets"]) for r in plain if r["metric"] == "proxy_fd"] == [(3, 1), (5, 3)]
    at5 = {r["metric"]: r for r in ext if r["step"] == 5}
    again = {r["metric"]: r for r in plain if r["step"] == 5}
    # The first 5 iterations of the extended baseline are the 5-iteration run's (no progress-dependent
    # schedule), so the values at the budget are the same numbers.
    assert at5["proxy_fd"]["value"] == again["proxy_fd"]["value"]
    assert at5["proxy_fd_sampler2"]["value"] == again["proxy_fd_sampler2"]["value"]
    sets = [float(v) for v in at5["proxy_fd"]["set_values"].split(",")]
    assert len(set(sets)) == 3 and at5["proxy_fd"]["value"] == pytest.approx(np.mean(sets))
    assert at5["proxy_fd"]["value_sd"] == pytest.approx(np.std(sets, ddof=1))
    assert at5["proxy_fd_sampler2"]["sampler_steps"] == 3 and at5["proxy_fd_sampler2"]["noise_sets"] == 1
    with pytest.raises(Exception, match="budget_iters"):
        TrainConfig.from_dict({**base, "iters": 5, "budget_iters": 6})
