"""One iteration's random draws: which images (per-epoch permutations), flips, timesteps (the
method's distribution by inverse CDF) and noise.

Every draw is a pure function of (seed, stream, step, sample): numpy generators keyed by the
run's seed, the stream, the step and the sample's index in the global batch
(bench.train.state.Streams). So seed k gives every method, device and process count the same draws, a process draws
only its own samples' noise (the costly part: 3 x 128 x 128 normals per image), and a checkpoint
needs no generator state. The timesteps, flips and label drops are a few uniforms per image, drawn
for the whole global batch by every process (microseconds; the log reads the global timesteps).

On a GPU a drawing thread draws the samples (images, flips, labels, noise) of the next steps while the
device computes, and takes their noise from a worker process (bench.train.noise_worker), which draws
it further ahead without sharing the interpreter lock with the training thread; the timesteps are
drawn as each step begins. Each step logs how long it waited for its batch, in wall time (take_batch)."""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.core.spec import loss_weights_at, sample_timesteps_at
from bench.train.noise_worker import NoiseWorker
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


def draw_samples(state: RunState, step: int, drawer: Drawer | None = None) -> tuple:
    """Iteration `step`'s draws that no method changes as it learns: this process's slice of the images,
    flips, labels (the null label where dropped) and noise, on the run's device (the noise from the
    drawer's worker process, when the drawing thread draws)."""
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
    eps = _noise(state, step, mine, drawer)
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
    of the samples' draw, plus the timesteps'. Wall time, not this thread's CPU time: the noise
    worker and the memory map's page faults are waits as much as the drawing itself."""
    start = _clock()
    if not state.prefetch:
        return draw_batch(state, step), _clock() - start
    batch = Batch(*_drawn_ahead(state, step), *draw_timesteps(state, step))
    # The next steps go to the drawing thread only now: a thread starting a draw holds the interpreter
    # lock, and each call of the timesteps' that lets it go would wait a switch interval (5 ms) for it.
    _draw_ahead(state, range(step + 1, min(step + 1 + AHEAD, state.cfg.iters)))
    return batch, _clock() - start


def _drawn_ahead(state: RunState, step: int) -> tuple:
    """`step`'s samples from the drawing thread, which draws the next AHEAD steps' while the device
    computes (draws are pure functions of the step: drawing early changes no number). One thread draws
    every sample of a run in step order, so nothing else touches the permutation cache, nor the noise
    worker."""
    pending = state.prefetched
    for k in [k for k in pending if k < step]:  # left by a caller that skipped steps: drop them
        del pending[k]
    _draw_ahead(state, [step])  # the first step, or the first after a jump
    return pending.pop(step).result()


def _draw_ahead(state: RunState, steps) -> None:
    """Hand `steps` to the drawing thread (started by the first), those not handed to it yet."""
    if state.drawer is None:
        state.drawer = Drawer(state)
    for k in steps:
        if k not in state.prefetched:
            state.prefetched[k] = state.drawer.pool.submit(draw_samples, state, k, state.drawer)


class Drawer:
    """The drawing thread, and the noise worker process it takes the noise from (None: the thread draws
    the noise itself, as when the worker cannot start; one warning says so)."""

    def __init__(self, state: RunState):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="diffbench-draw", initializer=_on_device,
                                       initargs=(state.rt.torch_device,))
        b = state.cfg.batch_size // state.rt.world_size
        try:
            self.noise = NoiseWorker(state.streams.stream_seed, range(state.rt.rank * b, (state.rt.rank + 1) * b),
                                     state.images.shape[1:], state.cfg.iters, 2 * AHEAD)  # AHEAD beyond the thread
        except OSError as exc:
            self.noise = None
            _without_worker(exc)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.noise is not None:
            self.noise.close()
            self.noise = None


def _without_worker(exc: Exception) -> None:
    warnings.warn(f"the noise worker process failed ({exc}): the drawing thread draws the noise itself "
                  "(the same numbers; the steps may wait longer for their batches)", RuntimeWarning, stacklevel=3)


def _noise(state: RunState, step: int, mine: range, drawer: Drawer | None) -> torch.Tensor:
    """This process's noise at `step`: from the drawer's worker process, else drawn here."""
    if drawer is not None and drawer.noise is not None:
        try:
            return torch.from_numpy(drawer.noise.take(step))
        except OSError as exc:  # the worker is gone: this run draws its noise in the thread from now on
            drawer.noise.close()
            drawer.noise = None
            _without_worker(exc)
    return state.streams.noise(step, mine, state.images.shape[1:])


def _on_device(device: torch.device) -> None:
    """The drawing thread's CUDA device is the run's (pinning and copies otherwise open a context on GPU 0)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def stop_drawing(state: RunState) -> None:
    """End the run's drawing thread (after what it is drawing now) and its noise worker; the next
    take_batch starts others."""
    if state.drawer is not None:
        state.drawer.shutdown()
        state.drawer = None
    state.prefetched.clear()
