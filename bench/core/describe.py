"""What a method does at training progress p: the tables behind `run_bench.py describe`."""

import torch

from bench.core.diffusion import Schedule
from bench.core.spec import (
    Method,
    ema_decay_at,
    loss_weights_at,
    optimizer_settings_at,
    timestep_probs_at,
    weight_norm_at,
)


def describe(method: Method, p: float, schedule: Schedule, target: str,
             beta1: float = 0.9, beta2: float = 0.999, ema_base: float = 0.9999, iters: int = 1000) -> dict:
    """Everything the method changes at progress p (of a budget of `iters` updates), as plain JSON-ready
    values. `importance` is p(t) w(t) normalised to sum 1: only this product sets the expected
    objective (the split between sampling and weighting changes the gradient's variance)."""
    t = torch.arange(schedule.T)
    lr_scale, b1, b2 = optimizer_settings_at(method, p, beta1, beta2)
    probs = timestep_probs_at(method, p, schedule)
    weights = loss_weights_at(method, t, p, schedule, target)
    importance = probs * weights
    return {
        "method": method.name,
        "label": method.label,
        "slots": sorted(method.slots),
        "params": dict(method.hp),
        "source": method.source,
        "weight_scale": method.weight_scale if "weighting" in method.slots else None,
        "weight_norm": weight_norm_at(method, p, schedule, target),
        "progress": p,
        "schedule": schedule.name,
        "T": schedule.T,
        "zero_terminal_snr": schedule.zero_terminal_snr,
        "target": target,
        "timestep_probs": probs.tolist(),
        "loss_weights": weights.tolist(),
        "importance": (importance / importance.sum()).tolist(),
        "lr_scale": float(lr_scale),
        "beta1": float(b1),
        "beta2": float(b2),
        "ema_decay": float(ema_decay_at(method, p, ema_base, max(1, round(p * iters)))),
    }


def trace(method: Method, schedule: Schedule, target: str, beta1: float, beta2: float, ema_base: float,
          points: int = 11, iters: int = 1000) -> dict:
    """describe() at evenly spaced progress points, column-wise (for method_trace.json)."""
    ps = [i / (points - 1) for i in range(points)]
    rows = [describe(method, p, schedule, target, beta1, beta2, ema_base, iters) for p in ps]
    keys = ("timestep_probs", "loss_weights", "importance", "lr_scale", "beta1", "beta2", "ema_decay")
    return {"label": method.label, "weight_scale": rows[0]["weight_scale"], "progress": ps,
            **{k: [r[k] for r in rows] for k in keys}}


def print_importance(rows: dict) -> None:
    """Every method's implied importance density p(t) w(t) (normalised), in 10 bins of T."""
    from rich.console import Console
    from rich.table import Table

    first = next(iter(rows.values()))
    T = first["T"]
    table = Table(title=f"p(t) w(t) per tenth of T at progress {first['progress']:g} ({first['schedule']} schedule, "
                        f"target {first['target']}); weights: normalised unless marked 'source'")
    table.add_column("method")
    for b in range(10):
        table.add_column(f"{b * T // 10}-", justify="right")
    for name, d in rows.items():
        imp = d["importance"]
        mark = " (source)" if d["weight_scale"] == "source" else ""
        table.add_row(name + mark, *(f"{sum(imp[b * T // 10:(b + 1) * T // 10]):.3f}" for b in range(10)))
    Console(width=max(Console().width, 132)).print(table)  # eleven columns: wider than a pipe's 80
