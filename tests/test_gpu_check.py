"""The GPU check's guard, peaks and rows (bench/tools/gpu_guard.py, gpu_check.py), on this CPU."""

import json
import os
import select
import signal
import subprocess
import sys
import threading

import pytest
from conftest import REPO, needs_inception

# Two gloo workers under torchrun: each reports its pid through a FIFO, then blocks for good (rank 0
# in a barrier that rank 1 never joins).
BLOCKING_WORKER = """
import os, sys, threading
import torch.distributed as dist
dist.init_process_group("gloo")
with open(sys.argv[1], "w") as fifo:
    fifo.write(f"{os.getpid()}\\n")
if dist.get_rank() == 0:
    dist.barrier()
threading.Event().wait()
"""


def _read_pids(fifo_fd: int, part_fd: int, n: int, stderr) -> list[int]:
    """The first `n` pids written to the FIFO; fails if the part exits first (bounded only to catch a hang)."""
    text = ""
    while text.count("\n") < n:
        ready, _, _ = select.select([fifo_fd, part_fd], [], [], 600)
        assert ready, "torchrun's workers never reported"
        if fifo_fd in ready:
            text += os.read(fifo_fd, 4096).decode()
        elif part_fd in ready:
            pytest.fail(f"torchrun exited before its workers reported: {stderr()}")
    return [int(x) for x in text.split()]


@pytest.mark.slow
def test_a_cut_part_leaves_no_process_behind(tmp_path):
    """A torchrun part cut at its guard: the launcher and both workers (each in a session of its own,
    which a process-group kill misses) have exited when the guard returns, proven by a pidfd each."""
    from bench.tools.gpu_guard import Part

    script, fifo = tmp_path / "worker.py", tmp_path / "pids.fifo"
    script.write_text(BLOCKING_WORKER)
    os.mkfifo(fifo)
    fifo_fd = os.open(fifo, os.O_RDWR)  # a writer of our own: reads block instead of seeing EOF
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    part = Part([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                 str(fifo)], cwd=tmp_path, env=env)
    fds = {}
    try:
        workers = _read_pids(fifo_fd, part.fd, 2, lambda: part.proc.stderr.read()[-2000:])
        for pid in [part.proc.pid, *workers]:
            fds[pid] = os.pidfd_open(pid)
        assert os.getsid(workers[0]) != os.getsid(part.proc.pid)  # what defeats a process-group kill
        # the guard's limit has passed; in a thread: survivors holding the output pipes would hang it
        done = {}
        guard = threading.Thread(target=lambda: done.update(result=part.finish(0)), daemon=True)
        guard.start()
        guard.join(300)  # bounded only to catch a hang
        assert "result" in done, "the guard never returned: processes it missed hold the part's output pipes"
        assert done["result"][0] is None
        alive = [pid for pid, fd in fds.items() if not select.select([fd], [], [], 0)[0]]
        assert not alive, f"processes left running after the cut: {alive}"
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "a worker was left unreaped"
    finally:
        for fd in fds.values():  # a failed check must not leave the workers blocking forever
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(fd)
        os.close(fifo_fd)


def test_the_check_fits_one_lease_by_its_own_estimate():
    """At most 8 minutes estimated for the most it runs (CUDA, 2 or more GPUs, so the NCCL slice;
    compile is opt-in), within the budget; every guard at least its part's estimate."""
    from bench.tools.gpu_check import BUDGET_S, PART_S, plan

    most = plan("cuda", 8, compile_=False)
    assert {"ddpm", "adm", "dit", "sampling", "inception", "imagenet", "nccl"} <= set(most)
    assert sum(PART_S[p][0] for p in most) <= BUDGET_S <= 8 * 60
    assert all(guard >= estimate for estimate, guard in PART_S.values())
    assert "nccl" not in plan("cuda", 1, compile_=False) and "compile" in plan("cuda", 1, compile_=True)


@pytest.mark.slow
@needs_inception  # its paper run computes an FID
def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    """`python -m bench.gpu_check --device cpu --quick`: every part at toy sizes, each in its own process
    (guards scaled 10x: a loaded machine must not cut a toy part; the guards are tested above). Every
    row is printed and written, with the figures derived from it consistent, and the file prices a
    dry run."""
    from bench.suite.cost import read_gpu_check
    from bench.tools.gpu_rows import forward_gflop

    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--guard-scale", "10",
                        "--out", str(out)], capture_output=True, text=True, timeout=3600, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO), "DIFFBENCH_QUIET": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("GPU check: 8 parts, 300 s by its own estimate")  # up front, before any part
    result = json.loads(out.read_text())
    assert result["cut"] == [] and result["estimate_s"] == 300
    rows = {(row["role"], row["setting"]): row for row in result["throughput"]}
    assert set(rows) == {("ddpm", "fp32 eager"), ("ddpm", "TF32"), ("ddpm", "fast path"),
                         ("ddpm", "fast, channels_last off"), ("adm", "fast path"), ("adm", "TF32"),
                         ("adm", "fast, channels_last off"), ("dit", "fast path")}  # on a CPU, auto is on
    for row in rows.values():
        assert row["images_per_s"] > 0 and 0 <= row["data_fraction"] < 1 and row["utilization"] is None  # no peak
        gflop = forward_gflop(row["network"], row["resolution"], 1000 if row["role"] == "adm" else 0)
        # both rounded: images/s to 0.1 (its error, 0.05, carried through), TFLOP/s to 0.01
        assert row["tflops"] == pytest.approx(row["images_per_s"] * 3 * gflop / 1e3, abs=0.005 + 0.05 * 3 * gflop / 1e3)
    assert rows[("adm", "fast path")]["resolution"] == 128 and rows[("dit", "fast path")]["network"] == "dit-s/8"
    s = result["sampling"][0]
    # rounded to 0.1 and 0.01: the two may differ by 0.05 + 0.005 x steps
    assert s["network_evals_per_s"] == pytest.approx(s["images_per_s"] * s["steps"], abs=0.05 + 0.005 * s["steps"])
    assert s["precision"] == "bf16" and result["checks"]["fast_over_eager_at_least_2x"] is None  # a GPU target
    assert result["inception"]["images_per_s"] > 0 and result["inception"]["batch"] == 8
    assert result["nccl"] == {"skipped": "no GPU in use"}
    im = result["imagenet"]
    assert im["state"] == "done" and im["memory_mapped"] is True and im["backend"] == "gloo" and im["processes"] == 2
    assert im["fid"] > 0 and im["resolution"] == 128
    assert result["paper_run"]["fid"] > 0 and result["paper_run"]["runtime"]["device"] == "cpu"
    for text in ("fast path / fp32 eager", "channels_last on / off: ddpm", "data wait, share of a step",
                 "unet-tiny sampling at 128 px, bf16", "Inception at batch 8", "ImageNet path: unet-tiny at 128 px",
                 "NCCL slice: no GPU in use", "paper-cifar10-shaped run", "TFLOP/s"):
        assert text in r.stdout, text
    measured = read_gpu_check(out)  # what a dry run prices from: the rows that are no variant
    assert {(t["arch"], t["precision"]) for t in measured["train"]} == {
        ("unet-tiny", "fp32"), ("unet-tiny", "tf32"), ("unet-tiny", "bf16"), ("dit-s/8", "bf16")}
    assert measured["sample"][0]["rate"] == s["network_evals_per_s"] and measured["peaks"] is None
