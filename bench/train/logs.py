"""A run's logs read whole (torch-free: the resume and the report share it): each row once, and every
evaluation the run made present.

A step's row (steps.jsonl) and a step's metric (evals.jsonl) are written once; a line that appears
twice is a copy (a log put back by hand, a file system's replay) and is dropped, while two different
rows for one step are two histories, and nothing tells which one is the run's. An evaluation is made
at fixed steps (bench.core.eval_steps), so one whose rows are gone is known to be missing."""

from __future__ import annotations

from pathlib import Path

from bench import fileio
from bench.core.eval_steps import eval_steps, evaluates
from bench.eval.spec import DEFAULTS as EVAL_DEFAULTS

STEP_KEY, EVAL_KEY = ("step",), ("step", "metric")
#: the budget's extra evaluations (bench.train.loop._budget_evaluations): metric suffix, spec key
BUDGET_EXTRAS = (("_final", "final_num_images"), ("_sampler2", "sampler2"))


def unique_rows(path: Path, key: tuple[str, ...], upto: int | None = None) -> tuple[list[dict], int, str | None]:
    """The complete rows of a JSON-lines log (those with step <= `upto`, when given), each `key` once:
    (rows, how many identical copies were dropped, the first conflict in words or None). A conflict is
    two different rows for one key; a row without the key's fields is kept as it is."""
    rows, seen, dropped = [], {}, 0
    for row in fileio.iter_jsonl(path):
        step = row.get("step")
        if upto is not None and isinstance(step, (int, float)) and step > upto:
            continue
        if not all(k in row for k in key):
            rows.append(row)
            continue
        k = tuple(str(row[f]) for f in key)
        if k not in seen:
            seen[k] = row
            rows.append(row)
        elif seen[k] == row:
            dropped += 1
        else:
            what = " ".join(f"{f} {row[f]}" for f in key)
            return rows, dropped, f"{path} has two different rows for {what}"
    return rows, dropped, None


def missing_evaluations(config: dict, rows: list[dict], upto: int) -> list[str]:
    """What a run with `config` (its config.json) evaluated up to step `upto` that `rows` (its evals.jsonl)
    lack, in words ("step 4", "proxy_kid at step 4"), in step order. Every evaluation logs its spec's
    metrics (and any other metric an evaluation logged), the budget's also their extra variants."""
    every, iters = config.get("eval_every") or 0, config.get("iters")
    if not isinstance(iters, int) or not evaluates(config.get("eval"), every):
        return []
    budget = config.get("budget_iters") or iters
    have: dict[int, set] = {}
    for r in rows:
        have.setdefault(r.get("step"), set()).add(r.get("metric"))
    spec = config.get("eval") if isinstance(config.get("eval"), dict) else {}
    metrics = spec.get("metrics") or EVAL_DEFAULTS["metrics"]
    metrics = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    base = {m for ms in have.values() for m in ms if isinstance(m, str) and not m.endswith(("_final", "_sampler2"))}
    base |= {m for m in metrics if m}
    missing = []
    for step in eval_steps(iters, every, budget):
        if step > upto:
            break
        if step not in have:
            missing.append(f"step {step}")
            continue
        wanted = set(base)
        if step == budget:
            wanted |= {m + suffix for m in base for suffix, on in BUDGET_EXTRAS if spec.get(on)}
        missing += [f"{m} at step {step}" for m in sorted(wanted - have[step])]
    return missing


def rewrite_rows(path: Path, rows: list[dict]) -> None:
    """The log holding exactly `rows` (atomically)."""
    fileio.atomic_write_bytes(path, "".join(fileio.dumps(r) + "\n" for r in rows).encode())
