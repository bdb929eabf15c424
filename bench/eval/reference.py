"""Reference statistics as their own step (``run_bench.py ref-stats``), before any training job.

The statistics of the reference images (and each evaluation's noise floor: the metric between N
real images and the reference) are computed once per evaluation spec, with the resize in
threads and the extractor in large batches on the device (Inception's reference images split among
every visible GPU: bench.eval.fid.feature_shards), and cached by key under the spec's
cache_dir (bench.eval.fid.stats_path). Every evaluation row then records their hash
(``ref_sha256``). The suite runner prepares them before its runs start; a training job computes
at most :data:`TRAIN_COMPUTE_LIMIT` images' worth itself (the mini suite's references, a test's)
and refuses larger ones with one line naming this step: 1.28M ImageNet images are not computed
by rank 0 of a training job while the other ranks wait.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable

from bench.eval.evaluate import Evaluator, check_eval_data
from bench.eval.inception import get_inception

# Images whose features a training job may compute for its references; a rehearsal scales it with the
# image counts, through the environment of its processes (bench/suite/rehearse.py).
TRAIN_COMPUTE_LIMIT = int(os.environ.get("DIFFBENCH_TRAIN_COMPUTE_LIMIT") or 10_000)


def distinct_specs(specs: Iterable[dict | None]) -> list[dict]:
    """The distinct evaluation specs among `specs` (None: a run without evaluation), in order."""
    seen, out = set(), []
    for spec in specs:
        key = json.dumps(spec, sort_keys=True, default=str)
        if spec is not None and key not in seen:
            seen.add(key)
            out.append(spec)
    return out


def evaluators_of(spec: dict, compute_limit: int | None = None) -> list[Evaluator]:
    """Every evaluation a run with `spec` makes that has its own references: the curve's N, and the
    budget's larger N (final_num_images) with its own noise floor."""
    main = Evaluator(spec, compute_limit)
    out = [main]
    if main.spec["final_num_images"]:
        out.append(main.variant(num_images=main.spec["final_num_images"], final_num_images=None, sampler2=None,
                                noise_sets=1))
    return out


def reference_devices(device) -> list:
    """The devices reference statistics are computed on: every visible GPU for "cuda" without an
    index (each takes a share of the images), else `device` alone."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", k) for k in range(torch.cuda.device_count())]
    return [device]


def floor_summary(floor: dict) -> str:
    """A noise floor as ref-stats prints it: its Frechet distance and what was done ("computed",
    "cached"), or why there is none ("not computable ...: why", cached as such)."""
    state = floor.get("state", "cached")
    if floor["fd"] is None:
        why = floor["source"].removeprefix("not computed: ")
        return f"not computable: {why} ({'cached' if state == 'cached' else 'recorded; the runs go on without one'})"
    return f"{floor['fd']:.6g} between {floor['source']} and the reference ({state})"


def prepare_references(specs: Iterable[dict | None], device=None, workers: int | None = None,
                       compute_limit: int | None = None, say: Callable[[str], None] | None = None) -> list[dict]:
    """Compute (or read from the cache) the reference statistics and noise floors of every spec; one
    summary dict per evaluation and feature family: dataset, split, resolution, num_ref, extractor,
    ref_sha256, cached (read, not computed), seconds, path, floor (:func:`floor_summary`). `workers`:
    resize threads."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shard_devices = reference_devices(device)
    rows = []
    for spec in distinct_specs(specs):
        check_eval_data(spec)
        for ev in evaluators_of(spec, compute_limit):
            s = ev.spec
            if {"fid", "kid"} & set(s["metrics"]) and (workers or len(shard_devices) > 1):
                total = int(workers or min(8 * len(shard_devices), os.cpu_count() or 1))
                for d in shard_devices:  # the shared extractors' resize threads: the CPUs split among the devices
                    get_inception(s["inception"], d, mode=s["fid_mode"]).resize_workers = max(1, total // len(shard_devices))
            if say:
                say(f"reference statistics: {s['dataset']} {s['ref_split']} at {s['resolution'] or 'native'} px, "
                    f"{', '.join(s['metrics'])}, N = {s['num_images']:,} ...")
            t0 = time.perf_counter()
            ev.prepare(shard_devices[0], shard_devices if len(shard_devices) > 1 else None)
            seconds = time.perf_counter() - t0
            for family in ("proxy", "inception"):
                if family in ev.prepared_families:
                    ext, ref, floor = ev.prepared_families[family]
                    rows.append({"dataset": s["dataset"], "split": s["ref_split"], "resolution": ev.resolution,
                                 "num_ref": int(ref.num), "num_images": s["num_images"], "extractor": ext.name,
                                 "ref_sha256": ref.sha256, "cached": not ref.computed, "seconds": round(seconds, 1),
                                 "path": str(ref.path) if ref.path else None, "floor": floor_summary(floor)})
                    if say and floor["fd"] is None:  # the runs proceed without it; the report says why
                        say(f"noise floor at N = {s['num_images']:,} ({ext.name}): {floor['source']}")
    return rows
