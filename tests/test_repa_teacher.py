"""REPA's teacher (a classifier of the proxy's architecture with its own seed, bench/eval/teacher.py, trained
by bench/eval/proxy.py's code) and the proxy classifier itself when none is shipped: the rule for a dataset
without a test split, one training per cache under a lock however many jobs ask at once, and the device it
trains on."""

import contextlib
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from bench.core.registry import get_method
from bench.data.loading import load_dataset
from bench.errors import DatasetError
from bench.eval import proxy as P
from bench.eval.teacher import TEACHER_SEED, get_teacher
from bench.models.networks import build_model

HANG_S = 600  # only catches a hang (a job that never signals); nothing below is timed


@pytest.fixture
def fresh(monkeypatch):
    """No extractor in memory: every get_proxy call goes to disk."""
    monkeypatch.setattr(P, "_LOADED", {})


def needs_cuda(test):
    """A `cuda` test: skipped without a GPU (conftest hides GPUs unless DIFFBENCH_TEST_CUDA=1)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU "
                                               "(python -m bench.gpu_check runs it)")(test))


def digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's tensors, names included (layout-independent: channels_last or not)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def repa_teacher(res: int = 8) -> torch.nn.Module:
    """REPA's frozen teacher for the synthetic set at `res` px (a classifier of its own, never shipped: so
    trained), built as a run builds it (the network on the CPU)."""
    model = build_model("unet-micro", 1, res)
    return get_method("repa").build_aux(model, (1, res, res), "synthetic", None).module.teacher


# -- the rule for a dataset without a test split -------------------------------------------------


def test_without_a_test_split_a_tenth_of_the_train_split_is_held_out_and_recorded(tmp_path, monkeypatch, fresh):
    def no_test_split(name, split="train", data_dir=None, resolution=None):
        if split == "test":
            raise DatasetError(f"{name} has no test split")
        return load_dataset(name, split, data_dir, resolution)

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_train(*args, **{**kwargs, "epochs": 1})  # (fewer epochs: what it reads is the point)

    real_train = P.train_proxy
    monkeypatch.setattr(P, "load_dataset", no_test_split)
    monkeypatch.setattr(P, "train_proxy", spy)
    ext = P.get_proxy("synthetic", 8, cache_dir=tmp_path)

    # 512 training images: 51 held out, 461 trained on, disjoint, together the whole split.
    rows, held = seen["indices"], P.held_out_split(512, 0)[1]
    assert (len(rows), len(held)) == (461, 51)
    assert sorted(rows.tolist() + held.tolist()) == list(range(512))
    record = json.loads((tmp_path / "proxy" / "synthetic-cnn-v1-r8-seed0.json").read_text())
    assert record["accuracy_split"] == "train, held out (no test split)" and record["held_out_images"] == 51
    assert record["train_images"] == 461 and record["device"] == "cpu"
    # The accuracy is the held-out images', measured again here.
    x, y = load_dataset("synthetic", "train", resolution=8)
    assert record["test_accuracy"] == P.accuracy(ext.model, x, y, indices=held)
    assert "held-out accuracy" in ext.source
    # Training never reads a held-out image: with those replaced by noise, the same weights.
    garbled = x.clone()
    garbled[held] = torch.randint(0, 256, (len(held), *x.shape[1:]), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(5))
    a = real_train(x, y, seed=0, epochs=1, indices=rows)
    b = real_train(garbled, y, seed=0, epochs=1, indices=rows)
    assert digest(a) == digest(b)
    assert digest(real_train(x, y, seed=0, epochs=1)) != digest(a)  # (and the rows do matter)


def test_with_a_test_split_the_teacher_is_trained_on_the_whole_train_split_as_before(tmp_path, fresh):
    ext = P.get_proxy("synthetic", 8, cache_dir=tmp_path)
    x, y = load_dataset("synthetic", "train", resolution=8)
    assert digest(ext.model) == digest(P.train_proxy(x, y, seed=0))  # the pre-existing call, bit for bit
    assert ext.info["accuracy_split"] == "test" and ext.info["train_images"] == 512
    assert "held_out_images" not in ext.info and "test accuracy" in ext.source


# -- the device -----------------------------------------------------------------------------------


def test_the_teacher_trains_on_the_runs_device_and_elsewhere_on_cuda_when_there_is_one(tmp_path, monkeypatch,
                                                                                       fresh):
    seen = []

    def spy(*args, device=None, **kwargs):  # records the device asked for, trains on this machine's CPU
        seen.append(torch.device(device or "cpu").type)
        with pytest.MonkeyPatch.context() as real:
            real.setattr(torch.cuda, "is_available", really_available)
            return real_train(*args, **{**kwargs, "epochs": 1})

    real_train, really_available = P.train_proxy, torch.cuda.is_available
    monkeypatch.setattr(P, "train_proxy", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the choice goes
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    repa_teacher()  # the run's network is on the CPU: its teacher trains there too
    P.get_proxy("synthetic", 12, cache_dir=tmp_path / "eval")  # no device named: CUDA, since there is one
    assert seen == ["cpu", "cuda"]


@needs_cuda
def test_on_a_gpu_the_teacher_trains_there_and_leaves_the_random_streams_alone(tmp_path, fresh):
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    ext = P.get_proxy("synthetic", 8, cache_dir=tmp_path, device="cuda")
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert ext.info["device"] == "cuda" and next(ext.model.parameters()).device.type == "cpu"
    assert ext.info["test_accuracy"] > 0.2  # it learned: twice chance (10 classes)


# -- one training, however many jobs ask --------------------------------------------------------


def _teacher_job(cache: str, role: str, counter: str, out: str, training, decided, go) -> None:
    """A job (its own process) asking for REPA's teacher. Each training appends `role` to `counter`.
    The first job, once training, waits for `go`; the second sets `decided` when it either trains
    or is about to wait for the first one's lock, so the two are known to overlap."""
    os.environ["DIFFBENCH_CACHE"] = cache
    real_train, real_lock = P.train_proxy, P.training_lock

    def counted_train(*args, **kwargs):
        with open(counter, "a") as f:
            f.write(role + "\n")
        (training if role == "first" else decided).set()
        if not go.wait(HANG_S):
            raise RuntimeError("hang guard: no go")
        return real_train(*args, **kwargs)

    @contextlib.contextmanager
    def announced_lock(*args, **kwargs):
        decided.set()
        with real_lock(*args, **kwargs):
            yield

    P.train_proxy = counted_train
    if role == "second":
        P.training_lock = announced_lock
    teacher = repa_teacher()
    Path(out).write_text(json.dumps({"teacher": digest(teacher),
                                     "sha256": get_teacher("synthetic", 8).weights_sha256}))


@pytest.mark.slow
def test_concurrent_jobs_train_the_teacher_once_and_all_load_it(tmp_path, monkeypatch, fresh):
    ctx = multiprocessing.get_context("spawn")
    training, decided, go = ctx.Event(), ctx.Event(), ctx.Event()
    cache, counter = str(tmp_path / "cache"), str(tmp_path / "trainings.txt")
    jobs = {role: ctx.Process(target=_teacher_job, args=(cache, role, counter, str(tmp_path / f"{role}.json"),
                                                         training, decided, go))
            for role in ("first", "second")}
    try:
        jobs["first"].start()
        assert training.wait(HANG_S), "the first job never began training"
        jobs["second"].start()  # while the first one trains, the cache still empty
        assert decided.wait(HANG_S), "the second job neither trained nor waited for the lock"
        go.set()
        for job in jobs.values():
            job.join(HANG_S)
            assert job.exitcode == 0, job.exitcode
    finally:
        for job in jobs.values():
            if job.is_alive():
                job.kill()
    assert Path(counter).read_text().splitlines() == ["first"]  # one training; the second job loaded it
    first, second = (json.loads((tmp_path / f"{role}.json").read_text()) for role in ("first", "second"))
    assert first == second

    # A third job finds the cache: no training at all, the same teacher.
    def boom(*args, **kwargs):
        raise AssertionError("the cached teacher was trained again")

    monkeypatch.setattr(P, "train_proxy", boom)
    monkeypatch.setenv("DIFFBENCH_CACHE", cache)
    assert digest(repa_teacher()) == first["teacher"]


# -- a REPA run on an imagenet128-shaped set --------------------------------------------------------


@pytest.mark.slow
def test_a_repa_run_trains_on_an_imagenet128_shaped_set_without_a_test_split(tmp_path, monkeypatch, fresh,
                                                                             fresh_datasets):
    from bench.data.generated import write_ilsvrc_like
    from bench.data.prepare import prepare
    from bench.train.loop import TrainConfig, train

    # 150 images: 15 held out, 135 left, one batch of 128 per epoch (the classifier's minimum).
    src = write_ilsvrc_like(tmp_path / "ILSVRC2012" / "train", 150, classes=4)
    prepared = prepare("imagenet128", str(src), tmp_path / "prepared", workers=1, progress=False)
    with pytest.raises(DatasetError, match="no test split"):
        load_dataset("imagenet128", "test", str(prepared))
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(dataset="imagenet128", data_dir=str(prepared), arch="unet-micro", method="repa", iters=1,
                      batch_size=2, warmup=0)
    assert train(cfg, tmp_path / "run")["state"] == "done"
    teacher = f"imagenet128-cnn-v1-r128-teacher-seed{TEACHER_SEED}.json"  # REPA's own, not the metric's
    record = json.loads((tmp_path / "cache" / "eval" / "proxy" / teacher).read_text())
    assert record["accuracy_split"] == "train, held out (no test split)"
    assert (record["held_out_images"], record["train_images"], record["num_classes"]) == (15, 135, 4)
