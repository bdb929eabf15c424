"""One iteration's random draws: which images (per-epoch permutations), flips, timesteps (the
method's distribution by inverse CDF) and noise, each from its own generator seeded by the run's
seed alone, so seed k gives every method, device and process count the same draws."""

from __future__ import annotations

import time

import torch

from bench.core.spec import loss_weights_at, timestep_probs_at
from bench.train.state import Batch, RunState


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


def stream_generators(seed: int, label_dropout: bool = False, stream_seed: int | None = None) -> dict[str, torch.Generator]:
    """One generator per random stream, each seeded from the run's seed alone; with `stream_seed`
    (a method's ``streams`` slot, the placebo's) the timestep and noise streams from that instead.

    Separate streams are what make seed k give every method the same noise and flips: the
    noise generator is never advanced by the timestep draw, whatever the method's distribution.
    Label dropout (classifier-free guidance) has its own stream, only in runs that use it.
    """
    streams = ((101, "t"), (202, "noise"), (303, "flip")) + (((404, "label"),) if label_dropout else ())
    own = seed if stream_seed is None else stream_seed
    return {name: torch.Generator().manual_seed((own if name in ("t", "noise") else seed) * 1_000_003 + offset)
            for offset, name in streams}


def sample_timesteps(probs: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n timesteps from `probs` by inverse CDF of n uniforms from `gen`.

    Every method consumes exactly n uniforms per step and maps uniform u to the same quantile
    of its own distribution, so methods at one seed share their random numbers (common random
    numbers) and the draw does not depend on how torch.multinomial uses a generator.
    """
    cdf = torch.cumsum(probs.double(), 0)
    u = torch.rand(n, generator=gen, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(probs) - 1)


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`x` on `device`; to a GPU through pinned memory without blocking (a pageable copy would wait for
    the step the device is computing, which the prefetched draw is meant to overlap)."""
    if x is None or x.device == device:
        return x
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


def draw_batch(state: RunState, step: int) -> Batch:
    """Iteration `step`'s random draws. The whole global batch is drawn from the run's generators
    (so nothing depends on the number of processes); this process keeps its slice of the images,
    flips and noise, and the global timesteps and loss weights for the log."""
    cfg, rt, B = state.cfg, state.rt, state.cfg.batch_size
    start = time.perf_counter()
    b = B // rt.world_size
    mine = slice(rt.rank * b, (rt.rank + 1) * b)
    dev = rt.torch_device
    idx = batch_indices(step, B, len(state.images), cfg.seed, state.perm_cache)[mine]
    idx = _to(idx, state.images.device)  # labels live beside the images (setup)
    images = state.images[idx]
    labels = None
    if state.num_classes:
        labels = state.labels[idx]
        if cfg.p_uncond > 0:  # classifier-free guidance: some labels become the null label K
            drop = (torch.rand(B, generator=state.gens["label"]) < cfg.p_uncond)[mine]
            labels = torch.where(drop.to(labels.device), state.num_classes, labels)
    flip = (torch.rand(B, generator=state.gens["flip"]) < 0.5)[mine] if cfg.flip else None
    t = sample_timesteps(timestep_probs_at(state.method, step / cfg.iters, state.schedule), B, state.gens["t"])
    weights = loss_weights_at(state.method, t, step / cfg.iters, state.schedule, cfg.target).to(torch.float32)
    eps = torch.randn((B, *state.images.shape[1:]), generator=state.gens["noise"])[mine]
    batch = Batch(*(_to(x, dev) for x in (images, flip, eps, labels, t, weights)), 0.0)
    batch.seconds = time.perf_counter() - start
    return batch
