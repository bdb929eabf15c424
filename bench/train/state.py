"""What a run holds while it trains: :class:`RunState` (everything one training step reads and
changes, saved whole in checkpoint.pt) and :class:`Batch` (one iteration's draws). The loop builds
them (bench.train.loop.setup; RunState wraps the model in DDP and torch.compile as the runtime asks),
bench.train.batches draws, bench.train.checkpoint saves and restores."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

import torch

from bench.core.config import TrainConfig
from bench.core.diffusion import Schedule
from bench.core.runtime import Runtime
from bench.core.spec import Method

if TYPE_CHECKING:  # type only: batches imports this module
    from bench.train.batches import Streams


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
    streams: "Streams"  # the keys of the random streams (bench.train.batches): draws need no state
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
