"""Small data sets in the real formats, made on the spot: CIFAR-10's pickled batches and ILSVRC's
train folder layout. The GPU check, the rehearsal of a suite (bench.suite.rehearse) and the tests
use them where the real data cannot be downloaded; the loaders that read them are the real ones."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar_like(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Smooth random colour images in cifar-10-batches-py's format (5 train batches, 1 test batch)."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def images(n):
        low = rng.uniform(0, 255, (n, 3, 4, 4))
        up = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)  # blocky 32x32, then noise
        return np.clip(up + rng.normal(0, 20, up.shape), 0, 255).astype(np.uint8).reshape(n, 3072)

    per = max(1, n_train // 5)
    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": images(per), "labels": rng.integers(0, 10, per).tolist()}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": images(n_test), "labels": rng.integers(0, 10, n_test).tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def write_ilsvrc_like(root: Path, n: int, classes: int = 4, seed: int = 0) -> Path:
    """n JPEGs of 160 x 144 px in ILSVRC's train layout (nXXXXXXXX/<wnid>_<k>.JPEG), `classes` classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(n):
        wnid = f"n{1440764 + k % classes:08d}"
        (root / wnid).mkdir(parents=True, exist_ok=True)
        low = rng.uniform(0, 255, (9, 10, 3))
        img = np.clip(np.repeat(np.repeat(low, 16, 0), 16, 1) + rng.normal(0, 20, (144, 160, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(root / wnid / f"{wnid}_{k}.JPEG", quality=90)
    return root
