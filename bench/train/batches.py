"""One iteration's random draws: which images (per-epoch permutations), flips, timesteps (the
method's distribution by inverse CDF) and noise.

Every draw is a pure function of (seed, stream, step, sample): numpy generators keyed by the
run's seed, the stream, the step and the sample's index in the global batch
(bench.train.state.Streams). So seed k gives every method, device and process count the same draws, a process draws
only its own samples' noise (the costly part: 3 x 128 x 128 normals per image), and a checkpoint
needs no generator state. The timesteps, flips and label drops are a few uniforms per image, drawn
for the whole global batch by every process (microseconds; the log reads the global timesteps).

On a GPU a drawing thread draws the samples (images, flips, labels, noise) of the next steps while the
device computes; the timesteps are drawn as each step begins. Each step logs how long it waited for
its batch, in wall time (take_batch)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.core.spec import loss_weights_at, sample_timesteps_at
from bench.train.state import Batch, RunState

DRAWS = "pcg64-seedsequence-v1"  # recorded in config.json: a run folder drawn another way is not resumed with these
AHEAD = 2  # steps whose samples the drawing thread draws ahead of the one the device computes
_clock = time.perf_counter  # the wall clock data waits are read from (a test steps it by hand)


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


def draw_samples(state: RunState, step: int) -> tuple:
    """Iteration `step`'s draws that no method changes as it learns: this process's slice of the images,
    flips, labels (the null label where dropped) and noise, on the run's device."""
    cfg, rt, B, streams = state.cfg, state.rt, state.cfg.batch_size, state.streams
    b = B // rt.world_size
    mine = range(rt.rank * b, (rt.rank + 1) * b)
    sl = slice(mine.start, mine.stop)
    idx = batch_indices(step, B, len(state.images), cfg.seed, state.perm_cache)[sl]
    idx = _to(idx, state.images.device)  # labels live beside the images (setup)
    if state.images.device.type == "cpu":  # numpy copies whole rows (torch's CPU gather went element by
        images = torch.from_numpy(state.images.numpy()[idx.numpy()])  # element: 6.8 ms against 0.03 for 128 x 32 px)
    else:
        images = state.images[idx]
    labels = None
    if state.num_classes:
        labels = state.labels[idx]
        if cfg.p_uncond > 0:  # classifier-free guidance: some labels become the null label K
            drop = torch.from_numpy(streams.uniforms("label", step, B)[sl] < cfg.p_uncond)
            labels = torch.where(drop.to(labels.device), state.num_classes, labels)
    flip = torch.from_numpy(streams.uniforms("flip", step, B)[sl] < 0.5) if cfg.flip else None
    eps = streams.noise(step, mine, state.images.shape[1:])
    return tuple(_to(x, rt.torch_device) for x in (images, flip, eps, labels))


def draw_timesteps(state: RunState, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration `step`'s timesteps and loss weights, for the whole global batch (the log reads them): one
    uniform per image, mapped to t by the method (by inverse CDF unless its batch is not i.i.d.), so
    methods at one seed share their random numbers. Drawn when the step begins: a feedback method's
    distribution follows the losses it saw up to the previous step."""
    cfg, dev = state.cfg, state.rt.torch_device
    t = sample_timesteps_at(state.method, state.streams.uniforms("t", step, cfg.batch_size), step / cfg.iters,
                            state.schedule)
    weights = loss_weights_at(state.method, t, step / cfg.iters, state.schedule, cfg.target).to(torch.float32)
    return _to(t, dev), _to(weights, dev)


def draw_batch(state: RunState, step: int) -> Batch:
    """Iteration `step`'s random draws, all of them, here and now."""
    return Batch(*draw_samples(state, step), *draw_timesteps(state, step))


def take_batch(state: RunState, step: int) -> tuple[Batch, float]:
    """Iteration `step`'s batch, and the wall seconds the step waited for it (steps.jsonl's
    data_seconds): the whole draw, or with the drawing thread (state.prefetch: on a GPU) what was left
    of the samples' draw, plus the timesteps'. Wall time, not this thread's CPU time: the noise's
    thread pool and the memory map's page faults are waits as much as the drawing itself."""
    start = _clock()
    samples = _drawn_ahead(state, step) if state.prefetch else draw_samples(state, step)
    batch = Batch(*samples, *draw_timesteps(state, step))
    return batch, _clock() - start


def _drawn_ahead(state: RunState, step: int) -> tuple:
    """`step`'s samples from the drawing thread, which goes on with the next AHEAD steps' meanwhile
    (draws are pure functions of the step: drawing early changes no number). One thread draws every
    sample of a run in step order, so nothing else touches the permutation cache."""
    if state.drawer is None:
        state.drawer = ThreadPoolExecutor(1, thread_name_prefix="diffbench-draw", initializer=_on_device,
                                          initargs=(state.rt.torch_device,))
    pending = state.prefetched
    for k in [k for k in pending if k < step]:  # left by a caller that skipped steps: drop them
        del pending[k]
    for k in range(step, max(step + 1, min(step + 1 + AHEAD, state.cfg.iters))):
        if k not in pending:
            pending[k] = state.drawer.submit(draw_samples, state, k)
    return pending.pop(step).result()


def _on_device(device: torch.device) -> None:
    """The drawing thread's CUDA device is the run's (pinning and copies otherwise open a context on GPU 0)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def stop_drawing(state: RunState) -> None:
    """End the run's drawing thread (after what it is drawing now); the next take_batch starts another."""
    if state.drawer is not None:
        state.drawer.shutdown(wait=True, cancel_futures=True)
        state.drawer = None
    state.prefetched.clear()
