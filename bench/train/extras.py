"""What some methods add to a run beyond hooks: an auxiliary loss with its own trainable module (the
``aux_loss`` slot) and EMA snapshots written to the run folder (the ``ema`` slot's snapshot hook)."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.core.spec import AuxModule, Method
from bench.errors import HyperparameterError
from bench.fileio import atomic_write

SNAPSHOT_DIR = "ema_snapshots"


class WithAux(torch.nn.Module):
    """The network and a method's auxiliary module as one module, so DDP averages the extra module's
    gradients with the network's and one forward returns both the prediction and the per-sample extra
    loss. The inner layer's output is caught by a forward hook registered once, on the training network
    only (the EMA copy is made before)."""

    def __init__(self, model: torch.nn.Module, aux: AuxModule, method: Method):
        super().__init__()
        self.model, self.aux = model, aux.module
        self._method = method  # not a submodule: a method is a plain object
        self._caught: dict[str, torch.Tensor] = {}
        layers = dict(model.named_modules())
        if aux.layer not in layers:
            raise HyperparameterError(
                f"method {method.name!r}: the network has no layer {aux.layer!r}; set layer= to one of "
                f"{', '.join(n for n in layers if n and n.count('.') <= 1)}")
        layers[aux.layer].register_forward_hook(lambda _m, _i, out: self._caught.__setitem__("out", out))

    def forward(self, x_t, t, labels, x0):
        pred = self.model(x_t, t) if labels is None else self.model(x_t, t, labels)
        extra = self._method.aux_loss(self.aux, self._caught.pop("out"), x0)
        return pred, extra


def build_aux(method: Method, model: torch.nn.Module, image_shape: tuple, dataset: str, data_dir,
              seed: int) -> AuxModule | None:
    """The method's auxiliary module (None without the ``aux_loss`` slot). Its initial weights come from
    their own seed, so the global random stream (dropout) stays the one every other method has."""
    if "aux_loss" not in method.slots:
        return None
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # manual_seed seeds CUDA too
        torch.manual_seed(seed * 1_000_003 + 77)
        return method.build_aux(model, tuple(image_shape), dataset, data_dir)


def write_ema_snapshot(out: Path, step: int, snapshot: dict) -> Path:
    """``ema_snapshots/<step>.pt``, atomically (a step redone after a resume writes the same bytes)."""
    path = Path(out) / SNAPSHOT_DIR / f"{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"step": step, **snapshot}, f))
    return path
