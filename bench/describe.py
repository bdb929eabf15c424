"""What a method does at training progress p: the tables behind `run_bench.py describe`."""

import torch

from bench.diffusion import Schedule
from bench.spec import Method


def timestep_probs(method: Method, p: float, schedule: Schedule) -> torch.Tensor:
    if "timesteps" in method.slots:
        return method.timestep_probs(p, schedule)
    return Method.timestep_probs(method, p, schedule)


def loss_weights(method: Method, t: torch.Tensor, p: float, schedule: Schedule, target: str) -> torch.Tensor:
    if "weighting" in method.slots:
        return method.loss_weights(t, p, schedule, target)
    return torch.ones(t.shape, dtype=torch.float64)


def optimizer_settings(method: Method, p: float, beta1: float, beta2: float) -> tuple[float, float, float]:
    """(lr_scale, beta1, beta2) at progress p, falling back to the configured betas."""
    if "optimizer" not in method.slots:
        return 1.0, beta1, beta2
    s = method.optimizer(p)
    return s.lr_scale, beta1 if s.beta1 is None else s.beta1, beta2 if s.beta2 is None else s.beta2


def ema_decay(method: Method, p: float, base: float) -> float:
    return method.ema_decay(p, base) if "ema" in method.slots else base


def describe(method: Method, p: float, schedule: Schedule, target: str,
             beta1: float = 0.9, beta2: float = 0.999, ema_base: float = 0.9999) -> dict:
    """Everything the method changes at progress p, as plain JSON-ready values."""
    t = torch.arange(schedule.T)
    lr_scale, b1, b2 = optimizer_settings(method, p, beta1, beta2)
    return {
        "method": method.name,
        "label": method.label,
        "slots": sorted(method.slots),
        "params": dict(method.hp),
        "source": method.source,
        "progress": p,
        "schedule": schedule.name,
        "T": schedule.T,
        "zero_terminal_snr": schedule.zero_terminal_snr,
        "target": target,
        "timestep_probs": timestep_probs(method, p, schedule).tolist(),
        "loss_weights": loss_weights(method, t, p, schedule, target).tolist(),
        "lr_scale": float(lr_scale),
        "beta1": float(b1),
        "beta2": float(b2),
        "ema_decay": float(ema_decay(method, p, ema_base)),
    }


def trace(method: Method, schedule: Schedule, target: str, beta1: float, beta2: float, ema_base: float,
          points: int = 11) -> dict:
    """describe() at evenly spaced progress points, column-wise (for method_trace.json)."""
    ps = [i / (points - 1) for i in range(points)]
    rows = [describe(method, p, schedule, target, beta1, beta2, ema_base) for p in ps]
    keys = ("timestep_probs", "loss_weights", "lr_scale", "beta1", "beta2", "ema_decay")
    return {"label": method.label, "progress": ps, **{k: [r[k] for r in rows] for k in keys}}
