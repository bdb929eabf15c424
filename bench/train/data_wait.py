"""How long a GPU step waits for its batch: the real data pipeline against a simulated device, on a CPU.

    python -m bench.train.data_wait [--steps 300] [--cold] [--json FILE]

The pipeline is the training loop's own: a prepared set read through its memory map, the drawing
thread (bench.train.batches.take_batch, as on a GPU) and its noise worker process. Two workloads:
ddpm-unet's (batch 128 at 32 px, a 15 ms step) and adm-unet's (32 images per GPU of a global batch of
256 on 8 GPUs, 128 px, 1000 classes, a 60 ms step). The device is a thread that takes each launched
step and is busy for the step's time without using a CPU; the training thread takes its batch, then
holds the interpreter for `launch_share` of the step (the kernel launches of an eager step), and waits
for the device when it is QUEUE steps ahead (a full launch queue) and every 25 steps (the loop's host
sync). Torch's intra-op threads are those the suite's runner gives each of a run's processes on this
machine (CPUs // processes, bench.suite.workers; torchrun's own default is 1): with more, the timesteps'
small CPU ops wait for a thread descheduled from a busy core. Reported: the data wait (steps.jsonl's
data_seconds) and the device's idle time, as shares of the step. What it leaves out: pinning and the copy to the GPU (about 1 ms for adm-unet's 8 MB per
step at PCIe speed, overlapped by the copy engine), and a first epoch read from a network file
system (--cold reads from this machine's disk instead of its page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.core.config import TrainConfig
from bench.core.diffusion import make_schedule
from bench.core.registry import get_method
from bench.core.runtime import Runtime
from bench.train.batches import draw_batch, stop_drawing, take_batch
from bench.train.state import Streams

#: (name, per-process batch, processes, resolution, classes, simulated step in ms, images in the set)
WORKLOADS = (("ddpm-unet", 128, 1, 32, 0, 15.0, 50_000), ("adm-unet", 32, 8, 128, 1000, 60.0, 20_000))
QUEUE, SYNC_EVERY = 1, 25  # steps the host may run ahead of the device; steps between host syncs (as the loop)


def write_prepared(folder: Path, n: int, resolution: int, classes: int, seed: int = 0) -> Path:
    """A prepared folder (bench/data/prepare.py's layout) of n random images: what `prepare` writes,
    without decoding any source."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, 3, resolution, resolution))
    for lo in range(0, n, 4096):  # in chunks: the set may be larger than the memory at hand
        images[lo:lo + 4096] = rng.integers(0, 256, images[lo:lo + 4096].shape, dtype=np.uint8)
    images.flush()
    del images
    np.save(folder / "labels.npy", rng.integers(0, max(classes, 1), n, dtype=np.int64) if classes else np.full(n, -1))
    manifest = {"format": "diffbench-prepared/1", "kind": "folder", "resolution": resolution, "channels": 3,
                "splits": {"train": {"images": "images.npy", "labels": "labels.npy", "written": n}},
                "command": "python -m bench.train.data_wait"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's pages, so the next reads go to the disk (a first epoch)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pipeline(folder: Path, batch: int, processes: int, classes: int, iters: int, seed: int = 0):
    """What take_batch reads of a RunState, built as setup() builds it (rank 0 of `processes`), minus
    the network: the memory-mapped set, its labels, the baseline method, the streams."""
    from bench.data.loading import load_dataset

    cfg = TrainConfig(dataset="folder", data_dir=str(folder), batch_size=batch * processes, iters=iters, flip=True,
                      class_cond=bool(classes), seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        images, labels = load_dataset("folder", "train", str(folder))
    rt = Runtime(device="cpu", device_name="cpu", precision="fp32", tf32=False, channels_last=False,
                 fused_adamw=False, compile=False, world_size=processes, rank=0, backend=None)
    return SimpleNamespace(cfg=cfg, rt=rt, method=get_method("baseline", {}, []),
                           schedule=make_schedule("linear", 1000),
                           images=images, labels=labels, num_classes=classes, streams=Streams(seed, seed),
                           perm_cache={}, prefetched={}, drawer=None, prefetch=True)


def simulate(state, step_ms: float, steps: int, launch_share: float = 0.3, warmup: int = 10) -> dict:
    """Train `steps` simulated steps of `step_ms` through the drawing thread; the waits after `warmup`."""
    step_s, launch_s = step_ms / 1e3, launch_share * step_ms / 1e3
    work, busy = queue.Queue(maxsize=QUEUE), {"first": None, "last": None, "n": 0}

    def device() -> None:
        while (k := work.get()) is not None:
            start = time.perf_counter()
            if k >= warmup:
                busy["first"] = busy["first"] or start
                busy["n"] += 1
            time.sleep(step_s)  # the GPU computing: no CPU, no interpreter lock
            busy["last"] = time.perf_counter()
            work.task_done()
        work.task_done()

    runner = threading.Thread(target=device, daemon=True)
    runner.start()
    waits = []
    for k in range(steps):
        if k == warmup:
            work.join()  # the measured stretch starts with an empty device queue
        _, waited = take_batch(state, k)
        waits.append(waited)
        end = time.perf_counter() + launch_s
        while time.perf_counter() < end:  # the launches hold the interpreter (the worst case)
            pass
        work.put(k)
        if (k + 1) % SYNC_EVERY == 0:
            work.join()
    work.join()
    work.put(None)
    runner.join()
    stop_drawing(state)
    measured = waits[warmup:]
    span = busy["last"] - busy["first"]
    return {"step_ms": step_ms, "launch_ms": round(launch_s * 1e3, 2), "steps": len(measured),
            "wait_ms": round(1e3 * statistics.fmean(measured), 3),
            "wait_p95_ms": round(1e3 * sorted(measured)[int(0.95 * (len(measured) - 1))], 3),
            "wait_share": round(statistics.fmean(measured) / step_s, 4),
            "device_idle_share": round(max(0.0, 1 - busy["n"] * step_s / span), 4)}


def draw_ms(state, steps: int = 10) -> tuple[float, float]:
    """(median wall ms, median CPU ms of this process: the noise's threads too) of one whole draw, in this
    thread, nothing overlapped. On a loaded machine the wall time is far above the CPU time."""
    walls, cpus = [], []
    for k in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        draw_batch(state, k)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return round(1e3 * statistics.median(walls), 2), round(1e3 * statistics.median(cpus), 2)


def measure(root: Path, steps: int = 300, cold: bool = False, launch_share: float = 0.3,
            workloads=WORKLOADS) -> list[dict]:
    """One row per workload: the serial draw time, then the simulated run's waits."""
    rows = []
    threads = torch.get_num_threads()
    try:
        for name, batch, processes, resolution, classes, step_ms, n in workloads:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
            folder = write_prepared(root / f"{name}-{resolution}", n, resolution, classes)
            state = pipeline(folder, batch, processes, classes, iters=steps)
            wall, cpu = draw_ms(state)
            if cold:
                drop_from_page_cache(folder / "images.npy")
            rows.append({"workload": name, "batch_per_process": batch, "processes": processes,
                         "resolution": resolution, "images": n, "cold": cold, "draw_ms": wall, "draw_cpu_ms": cpu,
                         "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
                         **simulate(state, step_ms, steps, launch_share)})
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cold", action="store_true", help="read the sets from the disk, not the page cache")
    parser.add_argument("--launch-share", type=float, default=0.3, help="share of each step the launches hold the "
                        "interpreter (default 0.3)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffbench-data-wait-") as tmp:
        rows = measure(Path(tmp), args.steps, args.cold, args.launch_share)
    for r in rows:
        print(f"{r['workload']:>10}: {r['batch_per_process']} x {r['resolution']} px per process, step "
              f"{r['step_ms']:.0f} ms; one draw {r['draw_ms']:.2f} ms ({r['draw_cpu_ms']:.2f} ms CPU); "
              f"waited {r['wait_ms']:.3f} ms per step "
              f"({100 * r['wait_share']:.2f}% of the step, p95 {r['wait_p95_ms']:.2f} ms); device idle "
              f"{100 * r['device_idle_share']:.2f}%{' (cold)' if r['cold'] else ''}; {r['cpus']} CPUs, "
              f"{r['threads']} torch thread(s), load "
              f"{r['load_before']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
