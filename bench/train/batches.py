"""One iteration's random draws: which images (per-epoch permutations), flips, timesteps (the
method's distribution by inverse CDF) and noise.

Every draw is a pure function of (seed, stream, step, sample): numpy generators keyed by the
run's seed, the stream, the step and the sample's index in the global batch
(bench.train.state.Streams). So seed k gives every method, device and process count the same draws, a process draws
only its own samples' noise (the costly part: 3 x 128 x 128 normals per image), and a checkpoint
needs no generator state. The timesteps, flips and label drops are a few uniforms per image, drawn
for the whole global batch by every process (microseconds; the log reads the global timesteps)."""

from __future__ import annotations

import time

import torch

from bench.core.spec import loss_weights_at, sample_timesteps_at
from bench.train.state import Batch, RunState

DRAWS = "pcg64-seedsequence-v1"  # recorded in config.json: a run folder drawn another way is not resumed with these
def batch_indices(step: int, batch_size: int, n: int, seed: int, cache: dict) -> torch.Tensor:
    """Indices of the images in iteration `step`: consecutive slices of per-epoch permutations.

    Each epoch's permutation comes from its own seed, so the order is a pure function of
    (seed, step): nothing to save for resume, and equal for every method with the same seed.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        if cache.get("epoch") != epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache.update(epoch=epoch, perm=torch.randperm(n, generator=g))
        take = min(batch_size - len(out), n - offset)
        out.extend(cache["perm"][offset: offset + take].tolist())
    return torch.tensor(out)


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`x` on `device`; to a GPU through pinned memory without blocking (a pageable copy would wait for
    the step the device is computing, which the prefetched draw is meant to overlap)."""
    if x is None or x.device == device:
        return x
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


def draw_batch(state: RunState, step: int) -> Batch:
    """Iteration `step`'s random draws: this process's slice of the images, flips and noise, and the
    global timesteps and loss weights (for the log). `seconds` is this thread's CPU time spent
    drawing (not the wall time, which would include waiting for the device)."""
    cfg, rt, B, streams = state.cfg, state.rt, state.cfg.batch_size, state.streams
    start = time.thread_time()
    b = B // rt.world_size
    mine = range(rt.rank * b, (rt.rank + 1) * b)
    sl = slice(mine.start, mine.stop)
    dev = rt.torch_device
    idx = batch_indices(step, B, len(state.images), cfg.seed, state.perm_cache)[sl]
    idx = _to(idx, state.images.device)  # labels live beside the images (setup)
    images = state.images[idx]
    labels = None
    if state.num_classes:
        labels = state.labels[idx]
        if cfg.p_uncond > 0:  # classifier-free guidance: some labels become the null label K
            drop = torch.from_numpy(streams.uniforms("label", step, B)[sl] < cfg.p_uncond)
            labels = torch.where(drop.to(labels.device), state.num_classes, labels)
    flip = torch.from_numpy(streams.uniforms("flip", step, B)[sl] < 0.5) if cfg.flip else None
    # One uniform per image of the global batch; the method maps them to t (by inverse CDF unless its
    # batch is not i.i.d.), so methods at one seed share their random numbers.
    t = sample_timesteps_at(state.method, streams.uniforms("t", step, B), step / cfg.iters, state.schedule)
    weights = loss_weights_at(state.method, t, step / cfg.iters, state.schedule, cfg.target).to(torch.float32)
    eps = streams.noise(step, mine, state.images.shape[1:])
    batch = Batch(*(_to(x, dev) for x in (images, flip, eps, labels, t, weights)), 0.0)
    batch.seconds = time.thread_time() - start
    return batch
