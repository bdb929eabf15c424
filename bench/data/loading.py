"""Datasets: loader files in the repository's ``datasets/`` folder, loaded by path (the folder
is not an installed package, so it never shadows Hugging Face ``datasets``).

A loader file defines NAME, CHANNELS, RESOLUTION, SOURCE and
``load(split, data_dir, cache_dir) -> (uint8 array [N,C,H,W], int64 labels [N])``.
"""

import functools
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import DatasetError

DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFBENCH_CACHE", Path.home() / ".cache" / "diffbench"))


def eval_cache_dir(path=None) -> Path:
    """Where proxy classifiers and reference statistics live: `path`, else $DIFFBENCH_CACHE/eval."""
    return Path(path) if path else cache_dir() / "eval"


@functools.cache
def registry() -> dict:
    out = {}
    for path in sorted(DATASETS_DIR.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"diffbench_datasets.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out[module.NAME] = module
    return out


def dataset_info(name: str):
    reg = registry()
    if name not in reg:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(reg))}")
    return reg[name]


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Area-average resize of uint8 images, rounded back to uint8 (a fixed, named transform)."""
    if images.shape[-1] == resolution:
        return images
    x = F.interpolate(images.float(), size=(resolution, resolution), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, split: str = "train", data_dir: str | None = None, resolution: int | None = None):
    """Return (uint8 tensor [N,C,H,W], int64 labels [N]) at the requested resolution."""
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r} for {name}; use train or test")
    try:
        images, labels = info.load(split, data_dir, cache_dir() / "data" / name)
    except FileNotFoundError as exc:
        raise DatasetError(str(exc)) from None
    labels = torch.from_numpy(np.array(labels, dtype=np.int64, copy=True))
    if isinstance(images, np.memmap):  # a prepared set (bench/data/prepare.py): read in place, never copied
        if resolution and images.shape[-1] != resolution:
            raise DatasetError(f"{name} in {data_dir} was prepared at {images.shape[-1]} px, and {resolution} px "
                               f"is asked: prepare it again with --resolution {resolution}, or drop resolution")
        with warnings.catch_warnings():  # read-only map: training never writes to it
            warnings.simplefilter("ignore", UserWarning)
            mapped = torch.from_numpy(images)
        mapped._diffbench_memmap = True  # see is_memory_mapped
        return mapped, labels
    images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))
    if resolution:
        images = resize_uint8(images, resolution)
    return images, labels


def is_memory_mapped(images: torch.Tensor) -> bool:
    """Whether a training set is read from a memory-mapped file (a prepared set), not held in memory."""
    return bool(getattr(images, "_diffbench_memmap", False))


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)
