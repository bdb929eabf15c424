"""The noise worker process (bench/train/noise_worker.py): the drawing thread's noise, drawn in a process
of its own on the GPU path. Its numbers are Streams.noise's bit for bit, take_batch through it equals
the inline draw, it ends with its parent (killed included), and a worker that fails falls back to the
thread with one warning."""

import dataclasses
import os
import select
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO

from bench.train import batches, noise_worker
from bench.train.data_wait import pipeline, write_prepared
from bench.train.noise_worker import NoiseWorker
from bench.train.state import Streams

GUARD_S = 60  # a guard against a hung test only: every wait below ends on an event, not on this clock


@pytest.mark.parametrize("samples, shape", [(range(0, 128), (3, 32, 32)), (range(64, 96), (3, 128, 128)),
                                            (range(5, 9), (1, 4, 4))], ids=["ddpm", "adm-rank2", "small-rank1"])
def test_the_workers_noise_is_streams_noise_bit_for_bit(samples, shape):
    # The worker's stream seed differs from the run seed (a placebo's re-seeded streams): it must be the
    # one keyed. The steps go in order, skip (4), jump back (a resume: 3) and pass the last step (9).
    streams, steps = Streams(seed=11, stream_seed=7), 10
    worker = NoiseWorker(streams.stream_seed, samples, shape, steps, ahead=2)
    try:
        for k in (0, 1, 2, 4, 5, 3, 9):
            got = worker.take(k)
            assert got.dtype == np.float32 and got.shape == (len(samples), *shape)
            assert np.array_equal(got, streams.noise(k, samples, shape).numpy()), f"step {k}"
        assert worker.proc.poll() is None  # answered by the worker process throughout
    finally:
        worker.close()
    assert worker.proc.returncode == 0


def test_the_worker_imports_no_torch():
    code = "import sys, bench.train.noise_worker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=GUARD_S)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def small_state(tmp_path, rank: int, processes: int = 4, steps: int = 7):
    """take_batch's view of a run on the prepared-set path: rank `rank` of `processes`, 10 classes."""
    folder = write_prepared(tmp_path / "set", 40, 8, 10)
    state = pipeline(folder, 3, processes, 10, iters=steps, seed=5)
    state.rt = dataclasses.replace(state.rt, rank=rank, world_size=processes)
    state.cfg = dataclasses.replace(state.cfg, p_uncond=0.2)  # labels dropped too: the label stream is read
    return state


def assert_same_batch(a, b):
    for name, x, y in zip(a.__dataclass_fields__, dataclasses.astuple(a), dataclasses.astuple(b)):
        assert (x is None and y is None) or torch.equal(x, y), name


@pytest.mark.parametrize("rank", [0, 3])
def test_take_batch_through_the_worker_equals_the_inline_draw(tmp_path, rank):
    state = small_state(tmp_path, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the worker starts: no fallback warning
        try:
            for k in range(state.cfg.iters):
                taken, waited = batches.take_batch(state, k)
                assert isinstance(state.drawer.noise, NoiseWorker) and state.drawer.noise.proc.poll() is None
                assert_same_batch(taken, batches.draw_batch(state, k))
                assert waited >= 0
            assert not state.prefetched  # nothing drawn past the run's end
            proc = state.drawer.noise.proc
        finally:
            batches.stop_drawing(state)
    assert state.drawer is None and proc.returncode == 0  # stop_drawing ended the worker


def test_the_worker_ends_when_its_stdin_closes():
    worker = NoiseWorker(1, range(2), (3, 4, 4), 10, ahead=2)
    worker.take(0)
    worker.proc.stdin.close()  # what the kernel does to the parent's end when the parent exits
    assert worker.proc.wait(GUARD_S) == 0


def test_the_worker_ends_when_its_parent_is_killed():
    # A parent that starts a worker, says its pid, and waits; SIGKILL gives it no chance to stop the worker.
    code = ("import sys; from bench.train.noise_worker import NoiseWorker\n"
            "w = NoiseWorker(1, range(2), (3, 4, 4), 10, ahead=2); w.take(0)\n"
            "print(w.proc.pid, flush=True); sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        pid = int(parent.stdout.readline())
        pidfd = os.pidfd_open(pid)  # the worker is the parent's child, not ours: its end is read from a pidfd
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        assert poller.poll(GUARD_S * 1000), f"the worker {pid} outlived its killed parent"
    finally:
        os.close(pidfd)


@pytest.mark.parametrize("command", [("/nonexistent/python",), (sys.executable, "-c", "pass")],
                         ids=["cannot-start", "ends-at-once"])
def test_a_worker_that_fails_falls_back_to_the_thread_with_one_warning(tmp_path, monkeypatch, command):
    monkeypatch.setattr(noise_worker, "COMMAND", command)
    state = small_state(tmp_path, rank=1)
    try:
        with pytest.warns(RuntimeWarning, match="noise worker process failed") as caught:
            for k in range(state.cfg.iters):
                assert_same_batch(batches.take_batch(state, k)[0], batches.draw_batch(state, k))
        assert state.drawer.noise is None  # the thread draws the noise itself
    finally:
        batches.stop_drawing(state)
    assert len([w for w in caught if "noise worker" in str(w.message)]) == 1
