"""The definition of a run's random numbers, in numpy alone: each draw's own generator, numpy's PCG64
seeded by SeedSequence(seed, spawn_key=(stream, step[, sample])), and the noise filled from them.

bench.train.state.Streams wraps these for the training loop (torch tensors); the noise worker
process (bench.train.noise_worker) draws with the same functions without importing torch, so a
number is the same whichever process drew it."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

STREAM = {"noise": 1, "t": 2, "flip": 3, "label": 4}
_THREADED_NUMBERS = 1 << 20  # noise draws at least this large are filled by several threads


def generator(seed: int, stream: str, *key: int) -> np.random.Generator:
    """The generator of `stream` at `key` (step, or step and sample) under `seed`: 128-bit states, so no
    two keys share numbers (torch's CPU generator keeps only 32 bits of a seed)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(STREAM[stream], *key))))


def fill_noise(out: np.ndarray, seed: int, step: int, samples: range) -> np.ndarray:
    """Fill `out` [len(samples), ...] (float32) with standard normals: sample i's from its own generator
    at `step`, whichever process draws it. Large draws in threads: numpy releases the GIL while it fills."""
    def fill(k: int) -> None:
        generator(seed, "noise", int(step), int(samples[k])).standard_normal(out=out[k], dtype=np.float32)

    if out.size >= _THREADED_NUMBERS and len(samples) > 1:
        with ThreadPoolExecutor(min(8, len(samples), os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(len(samples))))
    else:
        for k in range(len(samples)):
            fill(k)
    return out
