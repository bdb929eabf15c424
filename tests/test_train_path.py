"""The training path at GPU scale, checked on the CPU: the data wait in wall time and the drawing
thread (bench/train/batches.py), the checkpoint hashed as it is written with the other ranks waiting
outside any collective (bench/train/checkpoint.py), channels_last by network and device
(bench/core/runtime.py), and a lock where flock is refused (bench/fileio.py)."""

import builtins
import errno
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from bench import fileio
from bench.core.config import TrainConfig
from bench.errors import CheckpointError, ConfigError
from bench.train import batches
from bench.train.loop import settle, setup, step
from bench.train.resolve import resolve_run

TINY = dict(dataset="synthetic", arch="unet-micro", batch_size=4, iters=6, warmup=0, lr=1e-3)


def tiny_state(**kw):
    cfg = TrainConfig(**{**TINY, **kw})
    return setup(cfg, resolve_run(cfg).method)


# -- the data wait ------------------------------------------------------------------------------------


def hold_inside_draw(monkeypatch):
    """Make the next noise draw block until a helper thread lets it go; the helper first burns 50 ms of
    its own CPU time (no sleep), and returns how long, in wall time, the draw was held."""
    entered, release, held = threading.Event(), threading.Event(), {}
    real = batches._noise  # drawn here, or taken from the drawing thread's noise worker

    def noise(*args):
        entered.set()
        release.wait()  # as a page fault of the memory map or the noise worker: no CPU of this thread
        return real(*args)

    def helper():
        entered.wait()
        start, cpu = time.perf_counter(), time.thread_time()
        while time.thread_time() - cpu < 0.05:
            pass
        held["seconds"] = time.perf_counter() - start
        release.set()

    monkeypatch.setattr(batches, "_noise", noise)
    threading.Thread(target=helper, daemon=True).start()
    return held


@pytest.mark.parametrize("ahead", [False, True], ids=["inline", "drawing-thread"])
def test_the_data_wait_is_wall_time_the_step_was_held(monkeypatch, ahead):
    # Without a thread (the CPU) the step draws its own batch; with one (a GPU) it waits for the
    # thread's draw. Either way a draw held up outside this thread's CPU shows up in full.
    state = tiny_state()
    state.prefetch = ahead
    held = hold_inside_draw(monkeypatch)
    row = settle(state, [step(state)], time.perf_counter())[0]
    batches.stop_drawing(state)
    assert row["data_seconds"] >= held["seconds"] > 0


def test_drawing_ahead_in_a_thread_changes_no_number():
    # A feedback method's next timesteps follow the losses it saw: they are drawn when the step
    # begins, while images and noise come from the thread, drawn steps ahead.
    rows, weights = [], []
    for ahead in (False, True):
        state = tiny_state(method="loss_aware")
        state.prefetch = ahead
        pending = [step(state) for _ in range(state.cfg.iters)]
        rows.append([{k: v for k, v in r.items() if k not in ("images_per_s", "data_seconds", "train_seconds")}
                     for r in settle(state, pending, time.perf_counter())])
        assert not state.prefetched and (state.drawer is not None) == ahead  # nothing drawn past the run's end
        batches.stop_drawing(state)
        weights.append(list(state.model.parameters()))
    assert rows[0] == rows[1]
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_the_data_wait_benchmark_runs_the_real_pipeline_small(tmp_path):
    from bench.train.data_wait import measure

    small = (("ddpm-unet", 8, 1, 8, 0, 2.0, 64), ("adm-unet", 2, 4, 16, 10, 4.0, 40))  # the workloads' shapes, shrunk
    rows = measure(tmp_path, steps=14, workloads=small)
    assert [r["workload"] for r in rows] == ["ddpm-unet", "adm-unet"]
    for r in rows:
        assert r["steps"] == 4 and r["wait_ms"] >= 0 and r["wait_p95_ms"] >= 0 and 0 <= r["device_idle_share"] <= 1
        assert r["wait_share"] == pytest.approx(r["wait_ms"] / r["step_ms"], rel=1e-2, abs=1e-4)
    # the sets were prepared folders, read through their memory maps
    assert json.loads((tmp_path / "adm-unet-16" / "manifest.json").read_text())["splits"]["train"]["written"] == 40


# -- the checkpoint ------------------------------------------------------------------------------------


def count_reads(monkeypatch, folder: Path) -> list:
    """Every open of a file under `folder` for reading (builtins, io and os), recorded."""
    reads = []
    real_open, real_os_open = builtins.open, os.open

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve())
        except (TypeError, ValueError):
            return False

    def opened(path, mode="r", *args, **kw):
        if inside(path) and not any(c in mode for c in "wax+"):
            reads.append(str(path))
        return real_open(path, mode, *args, **kw)

    def os_opened(path, flags, *args, **kw):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR) == 0:
            reads.append(str(path))
        return real_os_open(path, flags, *args, **kw)

    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(io, "open", opened)  # pathlib's
    monkeypatch.setattr(os, "open", os_opened)
    return reads


def test_the_checkpoint_is_hashed_as_it_is_written_and_never_read_back(tmp_path, monkeypatch):
    from bench.train.checkpoint import save_checkpoint

    state = tiny_state()
    settle(state, [step(state)], time.perf_counter())
    out = tmp_path / "run"
    out.mkdir()
    reads = count_reads(monkeypatch, out)
    save_checkpoint(state, out / "checkpoint.pt")
    settle(state, [step(state)], time.perf_counter())
    save_checkpoint(state, out / "checkpoint.pt")  # the rotation: the previous keeps its own digest
    assert reads == []
    monkeypatch.undo()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        recorded = json.loads((out / name).with_suffix(".sha256").read_text())
        assert recorded["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_hashing_writer_hashes_exactly_what_reaches_the_file(tmp_path):
    data = {"w": torch.arange(100_000, dtype=torch.float32), "n": 3}
    digest = fileio.atomic_write(tmp_path / "x.pt", lambda f: torch.save(data, f), sha256=True)
    assert digest == hashlib.sha256((tmp_path / "x.pt").read_bytes()).hexdigest()
    assert fileio.atomic_write(tmp_path / "y", lambda f: f.write(b"abc")) is None


RANKS = r"""
import json, os, sys, datetime
from pathlib import Path
sys.path.insert(0, {repo!r})
from bench.core.config import TrainConfig
from bench.core import runtime
from bench.errors import CheckpointError
from bench.train import checkpoint
from bench.train.loop import setup
from bench.train.resolve import resolve_run

out, mode = Path(sys.argv[1]), sys.argv[2]
cfg = TrainConfig(dataset="synthetic", arch="unet-micro", batch_size=4, iters=2, gpus=2, device="cpu")
run = resolve_run(cfg)
rt = runtime.make_runtime(run.config)
state = setup(run.config, run.method, rt)
real = checkpoint.atomic_write


def gated(path, write, sha256=False):
    # Rank 0 writes only once rank 1 is either at the store's meeting after the write, or gone on.
    meet = runtime._MEET
    key = f"{{meet['prefix']}}/meet/{{meet['count']}}/1"
    while True:
        try:
            meet["store"].wait([key], datetime.timedelta(milliseconds=100))
            seen = "rank 1 waits at the store"
            break
        except Exception:
            if (out / "rank1-left").exists():
                seen = "rank 1 went on"
                break
    (out / "seen").write_text(seen)
    if mode == "fail":
        raise OSError(28, "No space left on device")
    return real(path, write, sha256)


if rt.rank == 0:
    checkpoint.atomic_write = gated
try:
    checkpoint.save_checkpoint(state, out / "checkpoint.pt")
    outcome = "ok"
except CheckpointError as exc:
    outcome = "CheckpointError: " + str(exc)
if rt.rank == 1:
    (out / "rank1-left").write_text("")
(out / f"rank{{rt.rank}}.txt").write_text(outcome)
runtime.finish_processes()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_other_ranks_wait_for_the_checkpoint_at_the_store_and_share_its_failure(tmp_path, mode):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(repo=str(REPO)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path), mode], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DIFFBENCH_WAIT_MIN": "5"})  # a hang ends as a failure
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "seen").read_text() == "rank 1 waits at the store"
    zero, one = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    if mode == "ok":
        assert zero == one == "ok"
        digest = json.loads((tmp_path / "checkpoint.sha256").read_text())["sha256"]
        assert digest == hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest()
    else:
        assert zero == one and zero.startswith("CheckpointError: could not write") and "No space left" in zero


# -- channels_last ----------------------------------------------------------------------------------------


def test_channels_last_is_chosen_by_network_and_device(monkeypatch):
    from bench.core import runtime
    from bench.models.networks import ARCHS

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert set(runtime.CHANNELS_LAST_CUDA) == set(ARCHS)  # every network has its measured entry
    for arch in ARCHS:
        assert runtime.channels_last_for(arch, cpu) is True  # as every committed CPU result trained
        assert runtime.channels_last_for(arch, cuda) is runtime.CHANNELS_LAST_CUDA[arch]
        assert runtime.channels_last_for(arch, cuda, True) is True  # a flag is a flag
        assert runtime.channels_last_for(arch, cpu, False) is False
    # GroupNorm's CUDA kernel converts NHWC both ways: the U-Nets are off until measured otherwise.
    assert not any(runtime.CHANNELS_LAST_CUDA[a] for a in ("ddpm-unet", "adm-unet", "unet-tiny"))
    monkeypatch.setitem(runtime.CHANNELS_LAST_CUDA, "ddpm-unet", True)
    assert runtime.channels_last_for("ddpm-unet", cuda) is True and runtime.channels_last_for("adm-unet", cuda) is False
    assert runtime.channels_last_for("a-plugin-net", cuda) is False


def test_channels_last_auto_trains_as_before_on_the_cpu_and_is_a_runtime_setting():
    from bench.core.config import RUNTIME_KEYS
    from bench.core.runtime import make_runtime
    from bench.train.run_folder import config_diff

    assert TrainConfig().channels_last == "auto" and "channels_last" in RUNTIME_KEYS
    assert make_runtime(TrainConfig(device="cpu")).channels_last is True
    assert make_runtime(TrainConfig(device="cpu", channels_last=False)).channels_last is False
    state = tiny_state()
    assert state.memory_format == torch.channels_last
    # A folder trained with channels_last = true (the old default) is the same run under "auto".
    assert config_diff({**TrainConfig().to_dict(), "channels_last": True}, TrainConfig().to_dict()) == []
    assert TrainConfig.from_dict({"channels_last": False}).channels_last is False
    with pytest.raises(ConfigError, match="channels_last' must be true, false or \"auto\""):
        TrainConfig.from_dict({"channels_last": "yes"})


# -- the lock -----------------------------------------------------------------------------------------------


def refuse_flock(monkeypatch, code=errno.ENOLCK):
    import fcntl

    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


LOCKER = r"""
import errno, fcntl, os, sys
sys.path.insert(0, {repo!r})
def flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = flock
from bench import fileio
lock = fileio.try_lock(sys.argv[1])
print("held" if lock is None else "got " + lock.kind)
"""


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL], ids=["ENOLCK", "EOPNOTSUPP", "EINVAL"])
def test_where_flock_is_refused_an_owner_file_locks_across_processes(tmp_path, monkeypatch, capsys, code):
    refuse_flock(monkeypatch, code)
    script = tmp_path / "locker.py"
    script.write_text(LOCKER.format(repo=str(REPO)))
    other = lambda: subprocess.run([sys.executable, str(script), str(tmp_path / ".lock")],  # noqa: E731
                                   capture_output=True, text=True, timeout=120).stdout.strip()
    lock = fileio.try_lock(tmp_path / ".lock")
    assert lock is not None and lock.kind == "owner file"
    assert "-o flock" in capsys.readouterr().err  # said once, naming the mount option
    assert fileio.try_lock(tmp_path / ".lock") is None  # held, in this process too
    assert other() == "held"
    assert fileio.lock_holder(tmp_path / ".lock") == f"host {socket.gethostname()}, pid {os.getpid()}"
    lock.close()
    assert not fileio.owner_file_of(tmp_path / ".lock").exists()
    assert other() == "got owner file"  # it ended, and its owner file is stale: broken and taken
    again = fileio.try_lock(tmp_path / ".lock")
    assert again is not None
    again.close()


def test_a_stale_owner_file_is_broken_and_a_live_one_of_another_host_is_kept(tmp_path, monkeypatch):
    refuse_flock(monkeypatch)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    owner = fileio.owner_file_of(tmp_path / ".lock")
    owner.write_text(json.dumps({**fileio._me(), "pid": int(gone), "started": 1}))
    lock = fileio.try_lock(tmp_path / ".lock")
    assert lock is not None
    lock.close()
    owner.write_text(json.dumps({**fileio._me(), "host": "another-node"}))
    assert fileio.try_lock(tmp_path / ".lock") is None  # its process cannot be checked from here
    assert fileio.lock_holder(tmp_path / ".lock") == f"host another-node, pid {os.getpid()}"


def test_a_run_folder_is_claimed_where_flock_is_refused(tmp_path, monkeypatch):
    from bench.train.run_folder import claim_run_folder, try_lock

    refuse_flock(monkeypatch)
    out = tmp_path / "run"
    with claim_run_folder(out):
        assert try_lock(out) is None  # a suite's worker skips it as held
        with pytest.raises(ConfigError, match="being trained by another process"):
            with claim_run_folder(out):
                pass
    assert not out.exists()  # claimed fresh, left empty: removed, owner file and all
    lock = try_lock(tmp_path)
    assert lock is not None
    lock.close()


def test_flock_still_locks_where_it_is_granted(tmp_path):
    lock = fileio.try_lock(tmp_path / ".lock")
    assert lock.kind == "flock" and fileio.try_lock(tmp_path / ".lock") is None
    lock.close()
    with fileio.locked(tmp_path / ".lock") as held:
        assert held.kind == "flock"


def test_a_checkpoint_failure_is_one_line_on_a_single_process(tmp_path, monkeypatch):
    from bench.train import checkpoint

    state = tiny_state()

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write", full)
    with pytest.raises(CheckpointError, match="could not write .* No space left on device"):
        checkpoint.save_checkpoint(state, tmp_path / "checkpoint.pt")
