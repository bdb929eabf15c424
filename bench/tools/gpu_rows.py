"""The GPU check's measuring parts (bench.tools.gpu_parts runs each in a process of its own):

- ``train_rows``: a network's training at several precisions, each row with images/s, achieved
  TFLOP/s (3 x the forward's FLOPs per image, counted on the meta device), utilization against the
  device's dense peak (bench.suite.cost.DEVICE_PEAK_TFLOPS), peak memory and the data wait's share
  of a step (the training loop's ``data_seconds``); the result file is rewritten after each row, so a
  part cut at its guard keeps the rows it finished;
- ``sampling``: DDIM sampling of ADM in bf16 (images/s and network evaluations/s);
- ``inception``: clean-fid's Inception at batch 500, the forward alone and with the CPUs' resize;
- ``nccl_rank``: one process of the NCCL slice, an all-reduce of adm-unet's gradient size.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.core.config import TrainConfig
from bench.suite.cost import TRAIN_FLOP_FACTOR, device_peaks, peak_tflops
from bench.train.loop import settle, setup, step, train_step
from bench.train.resolve import resolve_run

#: a training row's settings by precision (TrainConfig keys); bf16 is the fast path
SETTINGS = {
    "fp32": dict(precision="fp32", tf32=False, fused_adamw=False, channels_last=False),  # eager, as shipped before
    "tf32": dict(precision="fp32", tf32=True, fused_adamw=True, channels_last="auto"),
    "bf16": dict(precision="bf16", tf32=True, fused_adamw=True, channels_last="auto"),
}

#: the check's networks: (full size, --quick stand-in) architecture and batch per GPU, resolution,
#: data set (cifar10: generated CIFAR-format files; imagenet128: the prepared memory-mapped set)
NETWORKS = {
    "ddpm": dict(arch=("ddpm-unet", "unet-tiny"), batch=(128, 4), resolution=32, dataset="cifar10", class_cond=False),
    "adm": dict(arch=("adm-unet", "unet-tiny"), batch=(32, 2), resolution=128, dataset="imagenet128", class_cond=True),
    "dit": dict(arch=("dit-xl/2", "dit-s/8"), batch=(64, 4), resolution=32, dataset="cifar10", class_cond=False),
}
STEPS = {"warmup": (10, 1), "steps": (30, 2), "sample_batch": (128, 4), "sample_steps": (10, 2),
         "inception_batch": (500, 8)}


def _n(name: str, quick: bool) -> int:
    return STEPS[name][1 if quick else 0]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peaks(device: str) -> dict | None:
    import torch

    return device_peaks(torch.cuda.get_device_name(0)) if device.startswith("cuda") else None


def forward_gflop(arch: str, resolution: int, num_classes: int = 0) -> float:
    """One image's forward FLOPs through `arch` (GFLOP), counted on the meta device (nothing allocated)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models.networks import build_model

    with torch.device("meta"):
        net = build_model(arch, 3, resolution, num_classes=num_classes)
        args = [torch.zeros(1, 3, resolution, resolution), torch.zeros(1, dtype=torch.long)]
        with FlopCounterMode(display=False) as counter:
            net(*args, *([torch.zeros(1, dtype=torch.long)] if num_classes else []))
    return counter.get_total_flops() / 1e9


def rates(images_per_s: float, gflop: float, factor: float, precision: str, peaks: dict | None) -> dict:
    """Achieved TFLOP/s of `images_per_s` at `factor` x `gflop` per image, and its share of the peak."""
    tflops = images_per_s * factor * gflop / 1e3
    return {"gflop_per_image": round(gflop, 2), "tflops": round(tflops, 2),
            "utilization": round(tflops / peak_tflops(peaks, precision), 4) if peaks else None}


def _write(out: str, result: dict) -> None:
    tmp = Path(f"{out}.tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, out)  # a cut never leaves half a file


def train_rows(role: str, rows: list[dict], data_dir: str, device: str, quick: bool, out: str) -> dict:
    """Measure `rows` ({"setting", "precision", "channels_last"?, "compile"?}) of the network `role`
    (NETWORKS) one after the other; the file at `out` holds the rows finished so far."""
    import torch

    from bench.core.runtime import channels_last_for

    net = NETWORKS[role]
    arch, batch = net["arch"][quick], net["batch"][quick]
    auto = channels_last_for(arch, torch.device(device), "auto")
    gflop = forward_gflop(arch, net["resolution"], 1000 if net["class_cond"] else 0)
    result = {"rows": []}
    for spec in rows:
        settings, label = {**SETTINGS[spec["precision"]], "compile": bool(spec.get("compile"))}, spec["setting"]
        if spec.get("channels_last") == "flip":  # the fast path with channels_last the other way
            settings["channels_last"] = not auto
            label = f"fast, channels_last {'on' if not auto else 'off'}"
        row = {"role": role, "network": arch, "setting": label, "precision": spec["precision"],
               "resolution": net["resolution"], "batch": batch, "variant": bool(spec.get("variant")),
               "channels_last": auto if settings["channels_last"] == "auto" else settings["channels_last"]}
        cfg = TrainConfig(dataset=net["dataset"], data_dir=data_dir, resolution=net["resolution"], arch=arch,
                          class_cond=net["class_cond"], batch_size=batch, iters=1_000_000, warmup=0, lr=1e-4,
                          flip=True, device=device, **settings)
        try:
            row.update(_measure(cfg, device, quick))
            row.update(rates(row["images_per_s"], gflop, TRAIN_FLOP_FACTOR, spec["precision"], _peaks(device)))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        result["rows"].append(row)
        _write(out, result)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the next row's peak memory is its own
    return result


def _measure(cfg: TrainConfig, device: str, quick: bool) -> dict:
    """Training images/s at `cfg`, peak memory and the data wait's share, after a warm-up."""
    import torch

    run = resolve_run(cfg)
    state = setup(run.config, run.method)
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    for _ in range(_n("warmup", quick)):  # warm-up (cuDNN's choices, compilation)
        train_step(state)
    _sync(device)
    warmup_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = _n("steps", quick)
    start = time.perf_counter()
    rows = settle(state, [step(state) for _ in range(steps)], start)  # launched as the loop does, read once
    elapsed = time.perf_counter() - start
    data_s = sum(r["data_seconds"] for r in rows)  # the loop's wait for each step's batch
    return {"params_m": round(sum(p.numel() for p in state.model.parameters()) / 1e6, 2),
            "warmup_s": round(warmup_s, 1), "images_per_s": round(cfg.batch_size * steps / elapsed, 1),
            "step_ms": round(1000 * elapsed / steps, 2), "data_ms": round(1000 * data_s / steps, 3),
            "data_fraction": round(data_s / elapsed, 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "final_loss": rows[-1]["loss"]}


def sampling(device: str, quick: bool) -> dict:
    """DDIM sampling of ADM at 128 px (--quick: unet-tiny), class-conditional, in bf16: a batch's
    images/s and network evaluations/s, after a warm-up batch."""
    import torch

    from bench.core.diffusion import make_schedule
    from bench.core.runtime import sampling_in
    from bench.eval.sampling import sample
    from bench.models.networks import build_model

    arch, res = NETWORKS["adm"]["arch"][quick], NETWORKS["adm"]["resolution"]
    batch, steps, dev = _n("sample_batch", quick), _n("sample_steps", quick), torch.device(device)
    model, schedule, halved = build_model(arch, 3, res, num_classes=1000).to(dev), make_schedule(), []
    kw = dict(batch_size=batch, sampler="ddim", spacing="linspace", device=dev, num_classes=1000,
              on_halve=lambda old, new: halved.append(new))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with sampling_in("bf16", dev):
        sample(model, schedule, "eps", batch, (3, res, res), steps=2, **kw)  # warm-up
        _sync(device)
        start = time.perf_counter()
        sample(model, schedule, "eps", batch, (3, res, res), steps=steps, **kw)
        _sync(device)
        seconds = time.perf_counter() - start
    row = {"network": arch, "precision": "bf16", "resolution": res, "batch": batch, "steps": steps,
           "images_per_s": round(batch / seconds, 2), "network_evals_per_s": round(batch * steps / seconds, 1),
           "halved_to": halved[-1] if halved else None,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None}
    return {**row, **rates(row["network_evals_per_s"], forward_gflop(arch, res, 1000), 1.0, "bf16", _peaks(device))}


def inception(device: str, quick: bool) -> dict:
    """clean-fid's Inception at batch 500 (--quick: 8): the forward alone on resized images (what the
    cost model prices per GPU), and with the resize of 32 px images on the CPUs (what a batch costs)."""
    import torch

    from bench.eval.inception import get_inception

    batch, dev = _n("inception_batch", quick), torch.device(device)
    ext = get_inception(device=dev)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    ext.features(images, batch_size=batch)  # warm-up: weights on the device, the resize's threads
    _sync(device)
    start = time.perf_counter()
    ext.features(images, batch_size=batch)
    _sync(device)
    end_to_end = time.perf_counter() - start
    resized = torch.stack([ext.resize(img) for img in images]).to(dev)
    with torch.inference_mode():
        ext.net(resized)
        _sync(device)
        start = time.perf_counter()
        for _ in range(2):
            ext.net(resized)
        _sync(device)
    forward = (time.perf_counter() - start) / 2
    return {"batch": batch, "images_per_s": round(batch / forward, 1),
            "end_to_end_images_per_s": round(batch / end_to_end, 1), "resize_workers": ext.resize_workers}


def nccl_rank(numel: int, out: str) -> dict:
    """One process of the NCCL slice: all-reduces of `numel` float32 (adm-unet's gradients) over every
    process, after a warm-up; rank 0's result has the bus bandwidth (nccl-tests' definition)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    x = torch.ones(numel, device="cuda")
    for _ in range(2):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    start, rounds = time.perf_counter(), 5
    for _ in range(rounds):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / rounds
    dist.destroy_process_group()
    gb = numel * 4 / 1e9
    return {"rank0": rank == 0, "processes": world, "backend": "nccl", "gigabytes": round(gb, 2),
            "all_reduce_ms": round(1000 * seconds, 1), "bus_gb_per_s": round(2 * (world - 1) / world * gb / seconds, 1)}
