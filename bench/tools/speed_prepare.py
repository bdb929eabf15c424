"""Speed benchmark of `prepare` (not a test): `python -m bench.tools.speed_prepare`. Measures prepare's
images/s per worker count on photo-like JPEGs of ImageNet's typical size, and the images/s of
gathering random training batches from a prepared images.npy memory map."""

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.prepare import prepare, start_pool


def _write_photo_like_jpegs(root: Path, n: int, wnids: int = 4, seed: int = 0) -> float:
    """ILSVRC-style tree of `n` JPEGs of ImageNet's typical size (about 400 x 350, quality 90) whose
    content compresses like a photo (smooth shapes plus grain), not like pure noise or flat colour.
    Returns the mean file size in bytes."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        w, h = int(rng.integers(380, 440)), int(rng.integers(330, 380))
        blobs = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
        arr = np.asarray(blobs.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        arr = arr + rng.normal(0, 10, (h, w, 3)).astype(np.int16)  # grain: about 85 KiB a file at quality 90
        folder = root / f"n{10000000 + i % wnids:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{folder.name}_{i}.JPEG"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes))


def _pool_startup_seconds(workers: int) -> float:
    """Seconds to start `workers` decoding processes as prepare does."""
    t = time.perf_counter()
    pool = start_pool(workers)
    if pool is not None:  # one worker decodes in this process
        pool.shutdown()
    return time.perf_counter() - t


def speed_benchmark(n_jpegs: int = 400, workers: tuple = (1, 2), n_load: int = 2000, batch: int = 128,
                    resolution: int = 128, batches: int = 50) -> dict:
    """Print and return prepare's images/s (per worker count) and the images/s of gathering random
    training batches from a prepared images.npy memory map."""
    import tempfile

    import torch

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mean_bytes = _write_photo_like_jpegs(tmp / "src", n_jpegs)
        print(f"{n_jpegs} JPEGs, about 400x350, quality 90, mean {mean_bytes / 1024:.0f} KiB; {os.cpu_count()} CPUs")
        out["worker_startup_s"] = _pool_startup_seconds(max(workers))
        print(f"starting {max(workers)} decode workers: {out['worker_startup_s']:.2f} s (paid once per run)")
        for w in workers:
            t = time.perf_counter()
            prepare("imagenet128", str(tmp / "src"), tmp / f"out{w}", resolution, workers=w, progress=False)
            rate = n_jpegs / (time.perf_counter() - t)
            out[f"prepare_workers{w}"] = rate
            print(f"prepare, workers={w}: {rate:.0f} images/s ({rate / w:.0f} per worker; wall time incl. start-up)")
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(n_load, 3, resolution, resolution))
        images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
        images.flush()
        del images
        mm = np.load(tmp / "images.npy", mmap_mode="r")
        rng = np.random.default_rng(1)
        t = time.perf_counter()
        for _ in range(batches):
            x = torch.from_numpy(mm[np.sort(rng.choice(n_load, batch, replace=False))])
        rate = batches * batch / (time.perf_counter() - t)
        out["load_memmap"] = rate
        print(f"memmap gather, {n_load} images at {resolution} px, random sorted batches of {batch}: "
              f"{rate:.0f} images/s ({x.shape}; page cache warm)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.tools.speed_prepare", description=__doc__)
    ap.add_argument("--images", type=int, default=400, help="JPEGs to prepare (default 400)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    a = ap.parse_args()
    speed_benchmark(a.images, tuple(a.workers))
