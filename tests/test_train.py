"""The training loop: determinism, exact resume after a kill, logs, and bad input."""

import gzip
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, needs_fashion, train_until

from bench import fileio
from bench.data.loading import load_dataset
from bench.errors import BenchError, CheckpointError, ConfigError, DatasetError, DivergenceError
from bench.models.networks import build_model
from bench.train.loop import TrainConfig, TrainEvents, train

SMALL = dict(dataset="synthetic", arch="unet-tiny", iters=12, batch_size=8, ckpt_every=4, warmup=3)


def weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return ckpt["model"], ckpt["ema"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "train_seconds", "data_seconds")} for r in rows]


@pytest.mark.parametrize("method", ["combined", "min_snr"])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, method):
    cfg = TrainConfig(method=method, **SMALL)
    train(cfg, tmp_path / "whole")

    class Killed(Exception):
        pass

    class Die(TrainEvents):
        def on_step(self, step, iters, row):
            if step == 7:  # after the checkpoint at 4, before the one at 8
                raise Killed("killed at step 7")

    with pytest.raises(Killed, match="^killed at step 7$"):
        train(cfg, tmp_path / "parts", Die())
    assert fileio.read_json(tmp_path / "parts" / "status.json")["step"] == 4
    status = train(cfg, tmp_path / "parts")
    assert status["state"] == "done" and status["step"] == 12
    for a, b in zip(weights(tmp_path / "whole"), weights(tmp_path / "parts")):
        assert_same_state(a, b)
    rows_whole = fileio.read_jsonl(tmp_path / "whole" / "steps.jsonl")
    rows_parts = fileio.read_jsonl(tmp_path / "parts" / "steps.jsonl")
    assert [r["step"] for r in rows_parts] == list(range(1, 13))
    assert strip_timing(rows_whole) == strip_timing(rows_parts)


@pytest.mark.slow
def test_sigkill_and_rerun_equals_uninterrupted(tmp_path):
    """A real kill -9 of the command-line process between checkpoints, at a step fixed in advance:
    the test plugin (tests/plugins/faulty.py) SIGKILLs its own process during iteration 20 of 60
    (progress p = 19 / 60 rounds to fault step 4 of its 8), so no clock decides where it lands."""
    plugin = str(REPO / "tests" / "plugins" / "faulty.py")
    args = [sys.executable, "run_bench.py", "train", "--method", "faulty", "--plugins", plugin, "--dataset",
            "synthetic", "--iters", "60", "--batch-size", "8", "--ckpt-every", "5", "--seed", "3"]
    env = {k: v for k, v in os.environ.items() if k != "FAULTS"}
    subprocess.run(args + ["--out", str(tmp_path / "whole")], cwd=REPO, check=True, capture_output=True, env=env)
    killed = subprocess.run(args + ["--out", str(tmp_path / "killed")], cwd=REPO, capture_output=True,
                            env={**env, "FAULTS": "a:kill@4"})
    assert killed.returncode == -signal.SIGKILL
    status = tmp_path / "killed" / "status.json"
    killed_at = fileio.read_json(status)["step"]
    assert killed_at == 15 and fileio.read_json(status)["state"] == "running"  # the checkpoint before the kill
    assert len(fileio.read_jsonl(tmp_path / "killed" / "steps.jsonl")) == 15
    subprocess.run(args + ["--out", str(tmp_path / "killed")], cwd=REPO, check=True, capture_output=True, env=env)
    for a, b in zip(weights(tmp_path / "whole"), weights(tmp_path / "killed")):
        assert_same_state(a, b)
    rows = fileio.read_jsonl(tmp_path / "killed" / "steps.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 61))


def test_same_seed_same_result_and_seeds_differ(tmp_path):
    cfg = TrainConfig(method="p2", **{**SMALL, "iters": 4})
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    train(TrainConfig(method="p2", **{**SMALL, "iters": 4, "seed": 1}), tmp_path / "c")
    assert_same_state(weights(tmp_path / "a")[0], weights(tmp_path / "b")[0])
    wa, wc = weights(tmp_path / "a")[0], weights(tmp_path / "c")[0]
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_without_clipping_no_gradient_norm_is_computed_and_training_is_the_same(tmp_path, monkeypatch):
    """grad_clip = 0 skips the norm (a pass over every gradient each step) and logs it as None; the
    updates equal those of a clip so large it never acts (its factor is exactly 1)."""
    loose = {**SMALL, "grad_clip": 1e9}
    train(TrainConfig(**loose), tmp_path / "loose")

    def no_norm(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called with clipping off")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_norm)
    train(TrainConfig(**{**SMALL, "grad_clip": 0.0}), tmp_path / "off")
    rows = fileio.read_jsonl(tmp_path / "off" / "steps.jsonl")
    assert all(r["grad_norm"] is None and r["clipped"] is False for r in rows)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("loose", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logs_config_and_method_hooks(tmp_path):
    cfg = TrainConfig(method="mdlrc", method_params={"compensation": "demon"}, **SMALL)
    train(cfg, tmp_path)
    record = fileio.read_json(tmp_path / "config.json")
    assert record["method_label"] == "mdlrc-compensationdemon" and record["iters"] == 12
    rows = fileio.read_jsonl(tmp_path / "steps.jsonl")
    for r in rows:
        p = r["p"]
        beta1 = 0.9 - 0.4 * p
        assert r["beta1"] == pytest.approx(beta1)
        warm = min(1.0, r["step"] / 3)
        assert r["lr"] == pytest.approx(2e-4 * warm * 0.1 / (1 - beta1))
        quartiles = [r[f"loss_q{i}"] for i in range(4)]
        assert any(q is not None for q in quartiles) and r["grad_norm"] > 0
    trace = fileio.read_json(tmp_path / "method_trace.json")
    assert trace["progress"][0] == 0 and trace["progress"][-1] == 1 and len(trace["timestep_probs"][0]) == 1000
    assert fileio.read_json(tmp_path / "status.json")["state"] == "done"


def test_clts_steers_sampled_timesteps(tmp_path, monkeypatch):
    """The t that train() draws late in a clts run follow clts's distribution at each step (far
    fewer t in [750, 1000) than the baseline draws from the same uniforms)."""
    from bench.core.diffusion import Schedule, make_schedule
    from bench.core.registry import get_method
    from bench.core.spec import timestep_probs_at

    drawn = {}
    original = Schedule.q_sample

    def spy(self, x0, t, eps):
        drawn[current].append(t.clone())
        return original(self, x0, t, eps)

    monkeypatch.setattr(Schedule, "q_sample", spy)
    for current in ("baseline", "clts"):
        drawn[current] = []
        # the smallest network: what is tested is which t the loop draws, which no network changes
        cfg = {**SMALL, "arch": "unet-micro", "iters": 20, "batch_size": 64}
        train(TrainConfig(method=current, **cfg), tmp_path / current)
    late = range(10, 20)  # p = 0.5 .. 0.95
    high = {m: sum(int((drawn[m][k] >= 750).sum()) for k in late) for m in drawn}
    clts, sch = get_method("clts"), make_schedule()
    expected = sum(64 * float(timestep_probs_at(clts, k / 20, sch)[750:].sum()) for k in late)
    # 640 draws; binomial sd about sqrt(expected): the count is within 4 sd of clts's own distribution.
    assert abs(high["clts"] - expected) < 4 * expected ** 0.5 + 1, (high, expected)
    assert high["clts"] < 0.6 * high["baseline"], high


def test_divergence_is_recorded(tmp_path):
    cfg = TrainConfig(method="baseline", **{**SMALL, "lr": 1e30, "warmup": 0, "grad_clip": 0.0})
    with pytest.raises(DivergenceError, match=r"^training diverged: non-finite loss \((nan|inf)\) at step \d+; lower lr or check the "
                                              r"method's hyperparameters$"):
        train(cfg, tmp_path)
    status = fileio.read_json(tmp_path / "status.json")
    assert status["state"] == "failed" and "non-finite loss" in status["reason"]


def test_corrupt_checkpoint_refused_without_loss(tmp_path):
    cfg = TrainConfig(**{**SMALL, "iters": 4})
    train(cfg, tmp_path)
    (tmp_path / "status.json").unlink()
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged .*no good checkpoint is left: delete it to restart"):
        train(cfg, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten
    assert len(fileio.read_jsonl(tmp_path / "steps.jsonl")) == 4


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_no_partial_file(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    train_until(TrainConfig(**SMALL), out, 5)  # checkpoint at step 4
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes go out, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"could not write .*checkpoint\.pt at step 8 \(OSError: \[Errno 28\] No "
                                              r"space left on device; \d+ MiB free there\); the previous checkpoint is kept"):
        train(TrainConfig(**SMALL), out)  # resumes at 4, fails writing the checkpoint at 8
    assert (out / "checkpoint.pt").read_bytes() == before
    assert fileio.read_json(out / "status.json")["step"] == 4  # what the kept checkpoint holds (D14)
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []

    # A write killed with its process leaves its temporary file; the next checkpoint removes it.
    monkeypatch.setattr(torch, "save", real_save)
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(TrainConfig(**SMALL), out)
    assert not stale.exists() and sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


def test_different_config_in_same_folder_refused(tmp_path):
    train(TrainConfig(**{**SMALL, "iters": 4}), tmp_path)
    with pytest.raises(ConfigError, match="different config.*iters"):
        train(TrainConfig(**{**SMALL, "iters": 8}), tmp_path)


@pytest.mark.parametrize("d,match", [
    ({"iters": "ten"}, "key 'iters' must be int"),
    ({"lr_max": 1}, "unknown key 'lr_max'"),
    ({"schedule": "sqrt"}, "schedule='sqrt' is not one of linear, cosine"),
    ({"ema_decay": 1.5}, r"ema_decay=1.5 must be in \[0, 1\)"),
    ({"method": "p3"}, "unknown method 'p3'"),
    ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
])
def test_malformed_config(d, match):
    """Types and ranges fail in TrainConfig; the method and dataset when the run is resolved, which
    is what every entry point does (bench.train.resolve), with where the value came from."""
    from bench.train.resolve import resolve_run

    with pytest.raises(BenchError, match=match) as err:
        resolve_run(d, where="my.toml: run x")
    assert str(err.value).startswith("my.toml: run x: ") and "\n" not in str(err.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from bench.cli import main

    cases = [
        (["train", "--method", "nope"], "unknown method 'nope'; known methods: baseline"),
        (["train", "--method", "p2", "--set", "gamma=-3", "--dataset", "synthetic"], "gamma=-3 is out of range"),
        (["train", "--dataset", "imagenet-1k"], "unknown dataset"),
        (["describe", "clts", "--progress", "2"], "outside [0, 1]"),
    ]
    for k, (argv, needle) in enumerate(cases):
        argv = [*argv, "--out", str(tmp_path / "x")] if argv[0] == "train" else argv
        if k == 0:  # the first as its own process (nothing printed at start-up), the others in this one
            out = subprocess.run([sys.executable, "run_bench.py", *argv], cwd=REPO, capture_output=True, text=True)
            rc, err = out.returncode, out.stderr
        else:
            rc, err = main(argv), capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert needle in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_missing_dataset_lists_every_source(tmp_path, monkeypatch, fresh_datasets):
    from bench.data import loading as data

    module = data.dataset_info("fashion-mnist")
    monkeypatch.setattr(module, "DEBIAN_DIR", tmp_path / "nowhere")
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *a, **k):
            raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", NoNetwork)
    empty = re.escape(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=rf"^fashion-mnist not found; tried: --data-dir {empty} .*apt-get install "
                                           r"dataset-fashion-mnist.*torchvision download .*no network") as err:
        load_dataset("fashion-mnist", "train", str(tmp_path / "empty"))
    msg = str(err.value)
    assert "--data-dir" in msg and "apt-get install dataset-fashion-mnist" in msg and "torchvision download" in msg


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_data_dir(tmp_path, fresh_datasets):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = load_dataset("fashion-mnist", "test", str(tmp_path))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), imgs) and np.array_equal(y.numpy(), labels)
    x16, _ = load_dataset("fashion-mnist", "test", str(tmp_path), 16)
    assert x16.shape == (5, 1, 16, 16)


def test_cifar10_tiny_set_in_torchvision_format(tmp_path, fresh_datasets):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        batches[name] = (data, labels)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    x, y = load_dataset("cifar10", "train", str(tmp_path))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert np.array_equal(x[0].numpy().reshape(-1), batches["data_batch_1"][0][0])
    xt, yt = load_dataset("cifar10", "test", str(tmp_path))
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == batches["test_batch"][1]


def test_ddpm_unet_parameter_count_and_forward():
    model = build_model("ddpm-unet", 3, 32)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


@needs_fashion
@pytest.mark.parametrize("method", ["baseline", "p2", "min_snr", "clts", "mdlrc", "combined"])
def test_every_method_trains_on_fashion_mnist(tmp_path, method):
    cfg = TrainConfig(method=method, dataset="fashion-mnist", arch="unet-tiny", iters=3, batch_size=16, flip=True)
    assert train(cfg, tmp_path)["state"] == "done"
    rows = fileio.read_jsonl(tmp_path / "steps.jsonl")
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


def test_plugin_method_trains_with_its_ema_slot(tmp_path):
    from test_methods import PLUGIN

    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "warm_ema.py").write_text(PLUGIN)
    cfg = TrainConfig(method="warm_ema", method_params={"start": 0.5}, plugins=[str(tmp_path / "plug")],
                      ema_warmup=False, **{**SMALL, "iters": 4})
    train(cfg, tmp_path / "run")
    rows = fileio.read_jsonl(tmp_path / "run" / "steps.jsonl")
    assert [r["ema_decay"] for r in rows] == pytest.approx([0.5 + (0.999 - 0.5) * s / 4 for s in range(4)])
    assert fileio.read_json(tmp_path / "run" / "config.json")["method_label"] == "warm_ema-start0.5"


def test_ema_warmup_follows_its_formula_and_forgets_the_initial_weights(tmp_path):
    cfg = TrainConfig(method="baseline", ema_decay=0.99, **{**SMALL, "iters": 1})
    train(cfg, tmp_path / "one")
    assert fileio.read_json(tmp_path / "one" / "config.json")["ema_warmup"] is True
    # Step k (0-based) uses min(0.99, (1 + k) / (10 + k)): 0.1 at the first step, so the EMA after
    # one step is 0.1 x initial weights + 0.9 x trained weights.
    assert fileio.read_jsonl(tmp_path / "one" / "steps.jsonl")[0]["ema_decay"] == pytest.approx(0.1)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg.arch, 1, 16).state_dict()
    model, ema = weights(tmp_path / "one")
    for k in init:
        if init[k].is_floating_point():
            torch.testing.assert_close(ema[k], 0.1 * init[k] + 0.9 * model[k], rtol=1e-5, atol=1e-6)
    cfg = TrainConfig(method="baseline", ema_decay=0.2, **{**SMALL, "iters": 6})
    train(cfg, tmp_path / "six")
    decays = [r["ema_decay"] for r in fileio.read_jsonl(tmp_path / "six" / "steps.jsonl")]
    assert decays == pytest.approx([min(0.2, (1 + k) / (10 + k)) for k in range(6)])  # 0.1, 0.1818, 0.2, ...


def test_every_method_gets_the_same_data_and_noise_at_a_seed(tmp_path):
    """Seed k pins initial weights, data order, the uniforms behind t, and the noise, for every method:
    at the first step (p = 0) every method draws the same t (clts is uniform at p = 0), so the
    unweighted MSE of the first step is the same number for all of them."""
    first = {}
    for method in ("baseline", "p2", "min_snr", "clts", "mdlrc", "combined", "lr_control"):
        train(TrainConfig(method=method, **{**SMALL, "iters": 1}), tmp_path / method)
        first[method] = fileio.read_jsonl(tmp_path / method / "steps.jsonl")[0]["mse"]
    assert len(set(first.values())) == 1, first
    other_seed = TrainConfig(method="baseline", **{**SMALL, "iters": 1, "seed": 1})
    train(other_seed, tmp_path / "seed1")
    assert fileio.read_jsonl(tmp_path / "seed1" / "steps.jsonl")[0]["mse"] != first["baseline"]


def test_train_wires_data_and_noise_apart_from_the_timestep_draw(tmp_path, monkeypatch):
    """Through train() itself: clts draws other timesteps than the baseline once p > 0, yet at every
    step both see the same images and the same noise (with flips on, so that stream is pinned too)."""
    from bench.core.diffusion import Schedule

    seen = {}
    original = Schedule.q_sample

    def spy(self, x0, t, eps):
        seen[current].append((x0.clone(), t.clone(), eps.clone()))
        return original(self, x0, t, eps)

    monkeypatch.setattr(Schedule, "q_sample", spy)
    for current in ("baseline", "clts"):
        seen[current] = []
        cfg = TrainConfig(method=current, flip=True, **{**SMALL, "iters": 6, "batch_size": 16})
        train(cfg, tmp_path / current)
    assert len(seen["baseline"]) == len(seen["clts"]) == 6
    for (xb, tb, eb), (xc, tc, ec) in zip(seen["baseline"], seen["clts"]):
        assert torch.equal(xb, xc) and torch.equal(eb, ec)
    assert torch.equal(seen["baseline"][0][1], seen["clts"][0][1])  # p = 0: clts is uniform
    assert any(not torch.equal(b[1], c[1]) for b, c in zip(seen["baseline"][1:], seen["clts"][1:]))


def test_noise_stream_does_not_depend_on_the_timestep_distribution():
    from bench.core.spec import inverse_cdf as sample_timesteps
    from bench.train.state import Streams

    T, B = 1000, 64
    uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
    peaked = torch.zeros(T, dtype=torch.float64)
    peaked[300:310] = 0.1
    streams = Streams(seed=0, stream_seed=0)
    draws = {}
    for name, probs in (("uniform", uniform), ("peaked", peaked)):
        ts = [sample_timesteps(probs, streams.uniforms("t", step, B)) for step in range(3)]
        noise = [streams.noise(step, range(B), (1, 4, 4)) for step in range(3)]
        draws[name] = (torch.stack(ts), torch.stack(noise))
    assert torch.equal(draws["uniform"][1], draws["peaked"][1])  # same noise, whatever t's distribution
    assert ((draws["peaked"][0] >= 300) & (draws["peaked"][0] < 310)).all()
    # Inverse CDF: the same uniforms give floor(u T) under the uniform distribution.
    u = torch.from_numpy(np.concatenate([streams.uniforms("t", step, B) for step in range(3)]))
    assert torch.equal(draws["uniform"][0].flatten(), (u * T).floor().long())
    # Each peaked t is the quantile of the same uniform: t = 300 + floor(10 u).
    assert torch.equal(draws["peaked"][0].flatten(), 300 + (u * 10).floor().long())


def test_draws_are_keyed_by_seed_stream_step_and_sample():
    """Counter-based draws: a sample's noise is the same whichever range it is drawn in; steps, seeds
    and streams differ; and the numbers are standard normal / uniform."""
    from bench.train.state import Streams

    s = Streams(seed=3, stream_seed=3)
    whole = s.noise(7, range(16), (2, 3, 3))
    assert torch.equal(whole[5:9], s.noise(7, range(5, 9), (2, 3, 3)))  # a slice drawn alone
    assert not torch.equal(whole, s.noise(8, range(16), (2, 3, 3)))  # another step
    assert not torch.equal(whole, Streams(seed=4, stream_seed=4).noise(7, range(16), (2, 3, 3)))
    assert not np.array_equal(s.uniforms("t", 7, 16), s.uniforms("flip", 7, 16))  # streams are separate
    # Seeds 2**32 apart differ (torch's CPU generator keeps 32 bits of a seed; SeedSequence keeps them all).
    assert not torch.equal(Streams(1, 1).noise(0, range(2), (4,)), Streams(1 + 2**32, 1 + 2**32).noise(0, range(2), (4,)))
    big = s.noise(0, range(64), (1, 32, 32)).flatten()
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01  # 65,536 normals
    u = s.uniforms("t", 0, 100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005


def test_each_process_draws_the_slice_of_a_one_process_draw():
    """Rank r of N draws exactly rows r*B/N .. (r+1)*B/N of the one-process batch: images, flips,
    noise, labels with dropped ones, and the same global timesteps and weights."""
    import dataclasses

    from bench.core.registry import get_method
    from bench.train.batches import draw_batch
    from bench.train.loop import setup

    cfg = TrainConfig(dataset="synthetic", iters=8, batch_size=8, flip=True, class_cond=True, p_uncond=0.3)
    one = setup(cfg, get_method("clts"))
    for world in (2, 4):
        for rank in range(world):
            state = setup(cfg, get_method("clts"))
            state.rt = dataclasses.replace(state.rt, rank=rank, world_size=world)
            rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
            for step in (0, 5):
                a, b = draw_batch(one, step), draw_batch(state, step)
                for name in ("images", "flip", "eps", "labels"):
                    assert torch.equal(getattr(a, name)[rows], getattr(b, name)), (world, rank, step, name)
                assert torch.equal(a.t_global, b.t_global) and torch.equal(a.weights_global, b.weights_global)
    assert any((draw_batch(one, s).labels == one.num_classes).any() for s in range(8))  # some labels dropped


def test_steps_log_the_lr_factor_and_clipping(tmp_path):
    cfg = TrainConfig(method="mdlrc", **{**SMALL, "iters": 4, "grad_clip": 1e-6})
    train(cfg, tmp_path)
    rows = fileio.read_jsonl(tmp_path / "steps.jsonl")
    assert all(r["clipped"] for r in rows)  # every gradient norm is above 1e-6
    assert rows[0]["lr_scale"] == pytest.approx(1.0) and rows[-1]["lr_scale"] < 1.0
    for r in rows:
        assert r["lr"] == pytest.approx(cfg.lr * r["lr_scale"] * min(1.0, r["step"] / cfg.warmup))


def test_train_flags_set_ema_warmup():
    from bench.cli import build_parser, train_config_from_args

    parser = build_parser()
    on = train_config_from_args(parser.parse_args(["train", "--dataset", "synthetic"]))
    off = train_config_from_args(parser.parse_args(["train", "--dataset", "synthetic", "--no-ema-warmup"]))
    assert on.ema_warmup is True and off.ema_warmup is False


def test_a_resolved_run_is_the_callers_own(monkeypatch, tmp_path):
    """Resolutions are cached per process, but each caller gets its own config, spec and record
    and method (a method may learn during a run), and the spec follows $DIFFBENCH_CACHE."""
    from bench.train.resolve import resolve_run

    cfg = {**SMALL, "eval": {"metrics": ["proxy_fd"]}}
    a = resolve_run(cfg)
    a.record["lr"] = 99.0
    a.eval_spec["num_images"] = 7
    b = resolve_run(cfg)
    assert b.record["lr"] == TrainConfig().lr and b.eval_spec["num_images"] == 1000 and b.method is not a.method
    assert b.method.hp == a.method.hp
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "other"))
    assert resolve_run(cfg).eval_spec["cache_dir"] == str(tmp_path / "other" / "eval")


def test_train_without_out_writes_under_the_results_option(tmp_path, capsys):
    from bench.cli import main

    assert main(["--results", str(tmp_path / "res"), "train", "--dataset", "synthetic", "--arch", "unet-micro",
                 "--iters", "2", "--batch-size", "4"]) == 0
    # The suite's rule for the workload folder (tests/test_suite.py: synthetic-16_unet-tiny), resolution named.
    run = tmp_path / "res" / "train" / "synthetic-16_unet-micro" / "baseline" / "seed0"
    assert (run / "status.json").exists() and str(run) in capsys.readouterr().out.replace("\n", "")


def test_rows_read_once_per_sync_interval_are_the_rows_of_every_step(tmp_path, monkeypatch):
    """The loop reads the device's numbers once per interval (a GPU's 25 steps; forced to 4 here on the
    CPU): the same steps.jsonl as reading every step, one host read per interval, and a divergence
    still fails the run at the first non-finite step with the rows up to it."""
    import bench.train.loop as loop

    cfg = TrainConfig(method="clts", **{**SMALL, "iters": 10, "grad_clip": 1.0, "ckpt_every": 5})
    train(cfg, tmp_path / "every")
    reads = []
    real_settle = loop.settle
    monkeypatch.setattr(loop, "settle", lambda state, pending, since: reads.append(len(pending)) or
                        real_settle(state, pending, since))
    monkeypatch.setattr(loop, "SYNC_EVERY_CPU", 4)
    train(cfg, tmp_path / "grouped")
    assert reads == [4, 1, 3, 2]  # steps 1-4 (interval), 5 (checkpoint), 6-8 (interval), 9-10 (the end)
    timing = {"images_per_s", "data_seconds", "train_seconds"}
    every, grouped = (fileio.read_jsonl(tmp_path / d / "steps.jsonl") for d in ("every", "grouped"))
    assert [{k: v for k, v in r.items() if k not in timing} for r in every] == \
        [{k: v for k, v in r.items() if k not in timing} for r in grouped]
    assert all(r["train_seconds"] > 0 and r["images_per_s"] > 0 for r in grouped)

    bad = TrainConfig(method="baseline", **{**SMALL, "iters": 10, "lr": 1e30, "warmup": 0, "grad_clip": 0.0})
    with pytest.raises(DivergenceError, match=r"^training diverged"):
        train(bad, tmp_path / "bad")
    rows = fileio.read_jsonl(tmp_path / "bad" / "steps.jsonl")
    status = fileio.read_json(tmp_path / "bad" / "status.json")
    finite = [r["loss"] is not None and math.isfinite(r["loss"]) for r in rows]  # NaN is written as null
    assert finite == [True] * (len(rows) - 1) + [False]
    assert status["state"] == "failed" and status["step"] == rows[-1]["step"]
