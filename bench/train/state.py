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
from bench.core.spec import Method

_MASK64 = (1 << 64) - 1
_STREAM = {"noise": 1, "t": 2, "flip": 3, "label": 4}


@dataclass(frozen=True)
class Streams:
    """The keys of a run's random streams: its seed, and the seed of the timestep and noise streams
    (a method's ``streams`` slot, the placebo's, re-seeds those two; data order and flips stay)."""

    seed: int
    stream_seed: int

    def key(self, stream: str) -> list[int]:
        own = self.stream_seed if stream in ("t", "noise") else self.seed
        return [int(own) & _MASK64, _STREAM[stream]]

    def uniforms(self, stream: str, step: int, n: int) -> np.ndarray:
        """n uniforms in [0, 1) (float64) of `stream` at `step`: the whole global batch's."""
        return np.random.Generator(np.random.Philox(key=self.key(stream), counter=[0, 0, int(step), 0])).random(n)

    def noise(self, step: int, samples: range, shape) -> torch.Tensor:
        """Standard normal noise [len(samples), *shape] (float32) of the given global sample indices at
        `step`: sample i's is its own counter's, whichever process draws it."""
        out = np.empty((len(samples), *shape), dtype=np.float32)
        key = self.key("noise")
        for k, i in enumerate(samples):
            # Counter word 0 advances as numbers are drawn; the sample and step sit in words 1 and 2.
            gen = np.random.Generator(np.random.Philox(key=key, counter=[0, int(i), int(step), 0]))
            gen.standard_normal(out=out[k], dtype=np.float32)
        return torch.from_numpy(out)


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
    seconds: float  # CPU time spent drawing it


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
    step: int = 0
    clocks: dict = field(default_factory=lambda: {"train_seconds": 0.0, "eval_seconds": 0.0})
    perm_cache: dict = field(default_factory=dict)
    params: list = field(init=False)  # the model's parameters, listed once (clipping and EMA use them every step)
    net: torch.nn.Module = field(init=False)  # what a training step calls: the model, in DDP and compiled if asked
    dev_schedule: Schedule = field(init=False)
    prefetched: Batch | None = None  # the next step's batch, drawn while the device computes this one

    def __post_init__(self):
        self.params = list(self.model.parameters())
        self.net = self.model
        if self.rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.rt.torch_device
            self.net = DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if self.rt.compile:
            self.net = torch.compile(self.net)
        dev = self.rt.torch_device
        self.dev_schedule = self.schedule if dev.type == "cpu" else dataclasses.replace(
            self.schedule, betas=self.schedule.betas.to(dev), alphas_bar=self.schedule.alphas_bar.to(dev))
