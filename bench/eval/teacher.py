"""REPA's teacher: a classifier of the proxy's architecture ("cnn-v1", bench/eval/proxy.py) trained with its own
seed, so that the network REPA aligns the denoiser to is never the one whose features define proxy_fd and proxy_kid.

The source's teacher (DINOv2-B) is not the metric's network (Inception); aligning to the very network that scores
the samples would reward a method for imitating the judge. So the teacher is trained by proxy.py's code with
TEACHER_SEED (its own initialisation, data order and flips) on as many training images as the metric's classifier:
all of the train split, or, where there is no test split, nine tenths of it (its own held-out tenth, by its seed).
The shipped metric classifiers trained on all of their train split, so no share of it is unseen by them, and a
smaller share would only weaken the teacher. It is cached under its own name, ``<cache>/proxy/<proxy
name>-teacher-seed<seed>.pt`` with its record, never a file get_proxy loads (a different stem: no metric loads it),
trained once per dataset, resolution and cache under proxy.py's lock, on the device the caller names (a run's own).
Its identity (name, seed, weights' SHA-256) goes into the run's method_trace.json ("aux") through REPA's build_aux.
"""

from __future__ import annotations

from pathlib import Path

from bench.data.loading import dataset_info, eval_cache_dir
from bench.eval.proxy import ProxyExtractor, cached_or_trained, proxy_name

#: the teacher's seed: far from the metric classifiers' (0 for every shipped one, the eval spec's proxy_seed)
TEACHER_SEED = 1000


def teacher_name(dataset: str, resolution: int) -> str:
    """The teacher's name in records, e.g. "fmnist-cnn-v1-r12-teacher"."""
    return f"{proxy_name(dataset, resolution)}-teacher"


def teacher_paths(cache_dir, dataset: str, resolution: int, seed: int = TEACHER_SEED) -> tuple[Path, Path]:
    """Where the teacher is cached (the proxy cache folder, under a stem no metric extractor has)."""
    stem = f"{teacher_name(dataset, resolution)}-seed{seed}"
    folder = eval_cache_dir(cache_dir) / "proxy"
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def get_teacher(dataset: str, resolution: int | None = None, *, data_dir=None, cache_dir=None, device=None,
                seed: int = TEACHER_SEED, verbose: bool = False) -> ProxyExtractor:
    """REPA's teacher for (dataset, resolution): from memory, from the cache (checked against its record), else
    trained now on `device` (default: CUDA when there is one) under the lock, and cached; it comes back on the CPU."""
    res = int(resolution) if resolution else int(dataset_info(dataset).RESOLUTION)
    pt_path, json_path = teacher_paths(cache_dir, dataset, res, seed)
    return cached_or_trained(dataset, res, seed, data_dir, pt_path, json_path, name=teacher_name(dataset, res),
                             verbose=verbose, device=device)


def identity(ext: ProxyExtractor, role: str) -> dict:
    """What a run records of its teacher: name, seed, weights' SHA-256, where they come from, and its role
    ("separate": a network of its own; "metric": the evaluation's own classifier, the former default)."""
    return {"role": role, "name": ext.name, "seed": int(ext.info["seed"]), "weights_sha256": ext.weights_sha256,
            "source": ext.source}
