"""Reference statistics as their own step (``run_bench.py ref-stats``), before any training job.

The statistics of the reference images (and each evaluation's noise floor: the metric between N
real images and the reference) are computed once per evaluation spec, with the resize in
threads and the extractor in large batches on the device, and cached by key under the spec's
cache_dir (bench.eval.fid.stats_path). Every evaluation row then records their hash
(``ref_sha256``). The suite runner prepares them before its runs start; a training job computes
at most :data:`TRAIN_COMPUTE_LIMIT` images' worth itself (the mini suite's references, a test's)
and refuses larger ones with one line naming this step: 1.28M ImageNet images are not computed
by rank 0 of a training job while the other ranks wait.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

from bench.eval.evaluate import Evaluator, check_eval_data
from bench.eval.inception import get_inception

TRAIN_COMPUTE_LIMIT = 10_000  # images whose features a training job may compute for its references


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


def prepare_references(specs: Iterable[dict | None], device=None, workers: int | None = None,
                       compute_limit: int | None = None, say: Callable[[str], None] | None = None) -> list[dict]:
    """Compute (or read from the cache) the reference statistics and noise floors of every spec; one
    summary dict per evaluation and feature family: dataset, split, resolution, num_ref, extractor,
    ref_sha256, cached (read, not computed), seconds, path. `workers`: resize threads."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for spec in distinct_specs(specs):
        check_eval_data(spec)
        for ev in evaluators_of(spec, compute_limit):
            s = ev.spec
            if workers and {"fid", "kid"} & set(s["metrics"]):  # the shared extractor's resize threads
                get_inception(s["inception"], device, mode=s["fid_mode"]).resize_workers = int(workers)
            if say:
                say(f"reference statistics: {s['dataset']} {s['ref_split']} at {s['resolution'] or 'native'} px, "
                    f"{', '.join(s['metrics'])}, N = {s['num_images']:,} ...")
            t0 = time.perf_counter()
            ev.prepare(device)
            seconds = time.perf_counter() - t0
            for family in ("proxy", "inception"):
                if family in ev.prepared_families:
                    ext, ref, _ = ev.prepared_families[family]
                    rows.append({"dataset": s["dataset"], "split": s["ref_split"], "resolution": ev.resolution,
                                 "num_ref": int(ref.num), "num_images": s["num_images"], "extractor": ext.name,
                                 "ref_sha256": ref.sha256, "cached": not ref.computed, "seconds": round(seconds, 1),
                                 "path": str(ref.path) if ref.path else None})
    return rows
