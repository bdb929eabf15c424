"""What a run holds while it trains: :class:`Streams` (the keys every random draw is a function
of), :class:`RunState` (everything one training step reads and changes, saved whole in
checkpoint.pt) and :class:`Batch` (one iteration's draws). The loop builds
them (bench.train.loop.setup; RunState wraps the model in DDP and torch.compile as the runtime asks),
bench.train.batches draws, bench.train.checkpoint saves and restores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.core.config import TrainConfig
from bench.core.diffusion import Schedule
from bench.core.runtime import Runtime
from bench.core.spec import AuxModule, Method
from bench.train import numbers
from bench.train.extras import WithAux


@dataclass(frozen=True)
class Streams:
    """The keys of a run's random streams: its seed, and the seed of the timestep and noise streams
    (a method's ``streams`` slot, the placebo's, re-seeds those two; data order and flips stay).

    Each draw has its own generator: numpy's PCG64 seeded by SeedSequence(seed, spawn_key=(stream,
    step[, image])), numpy's own way to key independent streams (bench.train.numbers, the definition
    in numpy alone, which the noise worker process shares)."""

    seed: int
    stream_seed: int

    def _generator(self, stream: str, *key: int) -> np.random.Generator:
        return numbers.generator(self.stream_seed if stream in ("t", "noise") else self.seed, stream, *key)

    def uniforms(self, stream: str, step: int, n: int) -> np.ndarray:
        """n uniforms in [0, 1) (float64) of `stream` at `step`: the whole global batch's."""
        return self._generator(stream, int(step)).random(n)

    def noise(self, step: int, samples: range, shape) -> torch.Tensor:
        """Standard normal noise [len(samples), *shape] (float32) of the given global sample indices at
        `step`: sample i's is its own generator's, whichever process draws it."""
        out = np.empty((len(samples), *shape), dtype=np.float32)
        return torch.from_numpy(numbers.fill_noise(out, self.stream_seed, step, samples))


@dataclass
class Batch:
    """One iteration's draw: this process's slice of the images (indices), flips and noise, and the
    whole global batch's timesteps and loss weights (for the log), all on the run's device."""

    images: torch.Tensor  # uint8, this process's slice
    flip: torch.Tensor | None  # this process's slice
    eps: torch.Tensor  # this process's slice
    labels: torch.Tensor | None  # this process's slice: class labels (the null label K where dropped), or None
    t_global: torch.Tensor  # the whole global batch's timesteps (this process's are its slice)
    weights_global: torch.Tensor  # the whole global batch's loss weights


@dataclass
class RunState:
    """Everything one training step reads and changes: built by bench.train.loop.setup, saved whole in
    checkpoint.pt (state_dicts and RNG states) and restored by bench.train.checkpoint.resume."""

    cfg: TrainConfig
    method: Method
    rt: Runtime
    schedule: Schedule  # tables on the CPU (the method's view); dev_schedule: the same on the device
    images: torch.Tensor  # the training set, uint8 [N, C, H, W], on the device (or memory-mapped on the CPU)
    labels: torch.Tensor | None  # int64 [N] beside `images` (class-conditional runs), else None
    num_classes: int  # K of a class-conditional run (the null label is K), else 0
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    streams: Streams  # the keys of the random streams (bench.train.batches): draws need no state
    memory_format: torch.memory_format
    aux: AuxModule | None = None  # an ``aux_loss`` method's inner layer and extra trainable module
    step: int = 0
    clocks: dict = field(default_factory=lambda: {"train_seconds": 0.0, "eval_seconds": 0.0})
    perm_cache: dict = field(default_factory=dict)
    params: list = field(init=False)  # the model's parameters, listed once (the EMA averages them every step)
    trainable: list = field(init=False)  # what the optimizer steps and clipping sees: params and the aux module's
    net: torch.nn.Module = field(init=False)  # what a step calls: the model (with the aux module), in DDP, compiled
    dev_schedule: Schedule = field(init=False)
    prefetched: dict = field(default_factory=dict)  # step -> Future of its samples (bench.train.batches)
    drawer: object = None  # the drawing thread and its noise worker (batches.Drawer), started by the first draw
    prefetch: bool = field(init=False)  # draw ahead in that thread: on a GPU (a CPU has no device time to overlap)

    def __post_init__(self):
        self.params = list(self.model.parameters())
        self.net, self.trainable = self.model, list(self.params)
        if self.aux is not None:  # one forward returns the prediction and the per-sample extra loss
            self.net = WithAux(self.model, self.aux, self.method)
            self.trainable += [p for p in self.aux.module.parameters() if p.requires_grad]
        if self.rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.rt.torch_device
            self.net = DistributedDataParallel(self.net, device_ids=[dev.index] if dev.type == "cuda" else None)
        if self.rt.compile:
            self.net = torch.compile(self.net)
        dev = self.rt.torch_device
        self.prefetch = dev.type == "cuda"
        self.dev_schedule = self.schedule if dev.type == "cpu" else dataclasses.replace(
            self.schedule, betas=self.schedule.betas.to(dev), alphas_bar=self.schedule.alphas_bar.to(dev))
