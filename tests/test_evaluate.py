"""The evaluation hook that bench/train/loop.py calls."""

import math
import re

import numpy as np
import pytest
import torch
from conftest import needs_inception

from bench.core.diffusion import make_schedule
from bench.errors import ConfigError
from bench.eval.evaluate import Evaluator
from bench.eval.spec import DEFAULTS, resolve_spec
from bench.models.networks import build_model

ROW_KEYS = {"step", "metric", "value", "feature_extractor", "num_gen", "ref_split", "num_ref", "sampler",
            "sampler_steps", "eta", "eval_seconds", "ref_sha256", "sample_precision"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("unet-tiny", 1, 16).eval()


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear", 1000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module: the synthetic proxy is trained once."""
    return tmp_path_factory.mktemp("eval-cache")


def _spec(cache, **kw):
    return {"dataset": "synthetic", "metrics": ["proxy_fd", "proxy_kid"], "num_images": 24, "batch_size": 16,
            "sampler_steps": 4, "cache_dir": str(cache), **kw}


def test_rows_and_fixed_noise(cache, model, schedule):
    ev = Evaluator(_spec(cache))
    state = torch.get_rng_state()
    rows = ev.evaluate(model, schedule, "eps", step=100)
    assert torch.equal(torch.get_rng_state(), state)  # training's RNG stream is not disturbed
    assert [r["metric"] for r in rows] == ["proxy_fd", "proxy_kid"]
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["step"] == 100 and r["num_gen"] == 24 and r["num_ref"] == 24 and r["ref_split"] == "train"
        assert r["sampler"] == "ddim" and r["sampler_steps"] == 4 and r["eta"] == 0.0
        assert r["feature_extractor"] == "synthetic-cnn-v1-r16" and len(r["weights_sha1"]) == 40
        assert math.isfinite(r["value"]) and r["eval_seconds"] > 0
        assert r["eval_seconds"] >= r["sample_seconds"] and r["eval_seconds"] >= r["setup_seconds"]
    assert rows[0]["value"] > 0
    # The sampler's visited timesteps (the default spacing ends at 0) and the metric's noise floor:
    # the same metric for 24 real images outside the reference subset, far below an untrained model's.
    assert rows[0]["timestep_spacing"] == "linspace" and rows[0]["timesteps"] == "999,666,333,0"
    assert rows[0]["noise_floor_source"] == "24 real train images outside the reference subset"
    assert 0 < rows[0]["noise_floor"] < rows[0]["value"] / 5
    assert rows[0]["weights_shipped"] is True and len(rows[0]["weights_sha256"]) == 64

    # Fixed noise: the same model gives the same numbers, whatever the batch size.
    prepared = dict(ev._prepared)
    again = ev.evaluate(model, schedule, "eps", step=200)
    assert [r["value"] for r in again] == [r["value"] for r in rows]
    assert len(rows[0]["ref_sha256"]) == 16 and again[0]["ref_sha256"] == rows[0]["ref_sha256"]
    # The extractor and reference statistics are kept (the same objects, not loaded again).
    assert all(ev._prepared[k] is v for k, v in prepared.items())
    other_bs = Evaluator(_spec(cache, batch_size=7)).evaluate(model, schedule, "eps", step=100)
    for a, b in zip(other_bs, rows):
        assert abs(a["value"] - b["value"]) <= 1e-4 * abs(b["value"]) + 1e-9
    # Another noise seed gives other images, so other numbers.
    seeded = Evaluator(_spec(cache, noise_seed=1)).evaluate(model, schedule, "eps", step=100)
    assert [r["value"] for r in seeded] != [r["value"] for r in rows]


def test_model_mode_restored_and_ddpm_rows(cache, model, schedule):
    model.train()
    try:
        rows = Evaluator(_spec(cache, sampler="ddpm", sampler_steps=3, metrics=["proxy_fd"], num_ref=40,
                               ref_split="test")).evaluate(model, schedule, "v", step=1)
        assert model.training
    finally:
        model.eval()
    assert len(rows) == 1 and rows[0]["sampler"] == "ddpm" and rows[0]["eta"] is None
    assert rows[0]["num_ref"] == 40 and rows[0]["ref_split"] == "test"


def test_a_better_model_scores_better(cache, schedule):
    """An exact x0 'model' that always predicts real training images beats random outputs."""
    from bench.data.loading import load_dataset

    real, _ = load_dataset("synthetic", "train")
    bank = real[:24].float() / 127.5 - 1

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            return bank[torch.arange(len(x)) % len(bank)]

    class Junk(torch.nn.Module):
        def forward(self, x, t):
            return torch.sin(7 * x)

    ev = Evaluator(_spec(cache, metrics=["proxy_fd"], num_images=24))
    good = ev.evaluate(Oracle(), schedule, "x0", step=0)[0]["value"]
    bad = ev.evaluate(Junk(), schedule, "x0", step=0)[0]["value"]
    assert good < bad / 5, (good, bad)


def test_sampling_precision_is_an_option_every_row_names(cache, model, schedule):
    """fp32 by default on a CPU (TF32 does not exist there, so asking for it is fp32 too); bf16 autocast
    samples close to, but not exactly, fp32's images; the features are fp32 in every case."""
    from bench.core.runtime import sample_precision

    assert sample_precision(None, torch.device("cpu")) == "fp32" and sample_precision("tf32", torch.device("cpu")) == "fp32"
    assert sample_precision(None, torch.device("cuda")) == "tf32" and sample_precision("fp32", torch.device("cuda")) == "fp32"
    rows = {p: Evaluator(_spec(cache, sample_precision=p, metrics=["proxy_fd"])).evaluate(model, schedule, "eps", 1)[0]
            for p in (None, "tf32", "bf16")}
    assert [rows[p]["sample_precision"] for p in (None, "tf32", "bf16")] == ["fp32", "fp32", "bf16"]
    assert rows[None]["value"] == rows["tf32"]["value"]
    assert rows["bf16"]["value"] != rows[None]["value"]
    assert abs(rows["bf16"]["value"] - rows[None]["value"]) < 0.2 * rows[None]["value"]


def test_spec_checks():
    assert resolve_spec({})["metrics"] == DEFAULTS["metrics"]
    assert resolve_spec({"metrics": "fid, kid"})["metrics"] == ["fid", "kid"]
    assert resolve_spec({"sampler": "ddpm", "sampler_steps": None})["sampler_steps"] is None
    for bad, what in (({"metric": ["fid"]}, "unknown key 'metric'; known keys: dataset, "),
                      ({"metrics": ["is"]}, "unknown metric 'is'; use any of proxy_fd, proxy_kid, fid, kid"),
                      ({"metrics": []}, "unknown metric '(none given)'"),
                      ({"sampler": "euler"}, "unknown sampler 'euler'; use one of ddim, ddpm"),
                      ({"ref_split": "val"}, "ref_split must be train or test, got 'val'"),
                      ({"num_images": 1}, "num_images must be an integer >= 2, got 1"),
                      ({"eta": 2.0}, "eta must be a number in [0, 1], got 2.0"),
                      ({"sampler_steps": 0}, "sampler_steps must be an integer in 1.."),
                      ({"ddpm_variance": "huge"}, "unknown ddpm_variance 'huge'; use one of large, small"),
                      ({"timestep_spacing": "odd"}, "unknown timestep spacing 'odd'; use one of "),
                      ({"sample_precision": "fp16"}, "sample_precision must be fp32, tf32, bf16 or null")):
        with pytest.raises(ConfigError, match=f"^eval: {re.escape(what)}"):
            resolve_spec(bad)


def test_steps_beyond_T_fail_at_evaluation(cache, model):
    short = make_schedule("linear", 100)
    with pytest.raises(ConfigError, match="sampler_steps"):
        Evaluator(_spec(cache, sampler_steps=200)).evaluate(model, short, "eps", step=1)


@pytest.mark.slow
@needs_inception
def test_inception_metrics(cache, model, schedule):
    rows = Evaluator(_spec(cache, metrics=["fid", "kid", "proxy_fd"], num_images=12, num_ref=12)).evaluate(
        model, schedule, "eps", step=5)
    assert [r["metric"] for r in rows] == ["fid", "kid", "proxy_fd"]
    assert rows[0]["feature_extractor"] == "inception-v3-tf" and rows[0]["value"] > 0
    assert rows[0]["weights_sha1"] != rows[2]["weights_sha1"]
    assert all(r["num_ref"] == 12 and r["num_gen"] == 12 for r in rows)


def test_ref_stats_is_its_own_step_and_every_row_records_its_hash(tmp_path):
    """`run_bench.py ref-stats DATASET` computes the statistics once (then reads them), prints their
    hash, and an evaluation of the same spec records that hash in its rows."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "DIFFBENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(REPO / "run_bench.py"), "ref-stats", "synthetic", "--metrics", "proxy_fd",
           "--num-images", "24", "--device", "cpu"]
    first, second = (subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    assert "computed in" in first.stdout and "(cached)" in second.stdout
    sha = re.search(r"ref_sha256 ([0-9a-f]{16})", first.stdout).group(1)
    assert f"ref_sha256 {sha}" in second.stdout
    spec = {"dataset": "synthetic", "metrics": ["proxy_fd"], "num_images": 24, "sampler_steps": 2,
            "cache_dir": str(tmp_path / "cache" / "eval")}
    torch.manual_seed(0)
    row = Evaluator(spec).evaluate(build_model("unet-tiny", 1, 16).eval(), make_schedule("linear", 1000), "eps", 1)[0]
    assert row["ref_sha256"] == sha
    bad = subprocess.run([*cmd[:3], "no-such-thing"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ref-stats: 'no-such-thing' is neither a suite")


def test_a_training_job_refuses_a_large_reference_that_is_not_cached(tmp_path, monkeypatch):
    """Above the training job's limit (10,000 images; 10 here), an uncached reference is one error line
    naming ref-stats, before any step; once ref-stats has run, the same run trains."""
    import bench.train.loop as loop
    from bench.core.config import TrainConfig
    from bench.eval.reference import prepare_references
    from bench.train.loop import train

    monkeypatch.setattr(loop, "TRAIN_COMPUTE_LIMIT", 10)
    cfg = TrainConfig(dataset="synthetic", arch="unet-tiny", iters=2, batch_size=8, eval_every=2,
                      eval={"metrics": ["proxy_fd"], "num_images": 24, "sampler_steps": 1,
                            "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match=r"^reference statistics of 24 synthetic train images .* are not cached, "
                                          r"and a training job computes at most 10: run `python run_bench.py ref-stats"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "steps.jsonl").exists()
    from bench.train.resolve import resolve_run

    rows = prepare_references([resolve_run(cfg).eval_spec], device="cpu")
    assert [r["cached"] for r in rows] == [False]
    assert train(cfg, tmp_path / "run")["state"] == "done"


@pytest.mark.slow
@needs_inception
def test_reference_features_in_parallel_equal_the_serial_ones(tmp_path):
    """clean-fid's resize in 4 threads gives exactly the features (and so the statistics' hash) of 1."""
    from bench.data.loading import load_dataset
    from bench.eval.fid import reference_stats
    from bench.eval.inception import get_inception

    ext = get_inception(device="cpu")
    images, _ = load_dataset("synthetic", split="train")
    images = images[:20]
    serial, parallel = (ext.features(images, batch_size=8, resize_workers=w) for w in (1, 4))
    assert np.array_equal(serial, parallel)
    hashes, default = [], ext.resize_workers
    try:
        for workers in (1, 4):
            ext.resize_workers = workers
            hashes.append(reference_stats(ext, "synthetic", "train", num=20, cache_dir=tmp_path / f"w{workers}",
                                          images=images).sha256)
    finally:
        ext.resize_workers = default  # the extractor is shared by the process
    assert hashes[0] == hashes[1]


def test_an_evaluation_out_of_memory_halves_its_batch_says_so_once_and_scores_the_same(cache, model, schedule,
                                                                                         capsys):
    """A sampling batch that runs out of CUDA memory (simulated on the CPU: the network refuses more than
    3 images) is halved until it fits, said once in the run's log and recorded in the rows; the numbers
    are those of an evaluation run at the smaller batch from the start."""

    class OOMAbove3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, t):
            if x.shape[0] > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x, t)

    ev = Evaluator(_spec(cache, batch_size=8, metrics=["proxy_fd"]))
    rows = ev.evaluate(OOMAbove3().eval(), schedule, "eps", step=1)
    again = ev.evaluate(OOMAbove3().eval(), schedule, "eps", step=2)  # starts at the halved batch
    said = capsys.readouterr().err
    assert said.count("eval: CUDA out of memory sampling 8 images at once: batches of 4 from now on") == 1
    assert said.count("CUDA out of memory") == 1  # not again for 4 -> 2, nor on the next call
    assert rows[0]["sample_batch_size"] == 2 and rows[0]["sample_batch_halvings"] == 2
    plain = Evaluator(_spec(cache, batch_size=2, metrics=["proxy_fd"])).evaluate(model, schedule, "eps", step=1)
    assert rows[0]["value"] == again[0]["value"] == plain[0]["value"] and "sample_batch_size" not in plain[0]
