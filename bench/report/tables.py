"""The report's data: the run folders of a results tree, the tidy evaluation table, curves and
metrics at fractions of the budget, and the table writers (Markdown, LaTeX). Files only, no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import iter_jsonl, read_jsonl, unreadable_lines
from bench.report.curves import complete_points, values_at_fractions
from bench.report.stats import seed_curves

SKIP_DIRS = {"report", "_submitit", "figures", "tables"}

N_BINS = 100  # steps.jsonl is summarised in this many bins of the budget for the figures

def read_json_or_none(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None

def find_runs(suite_dir: Path) -> list[dict]:
    """Every run folder <workload>/<label>/seed<k> with what it holds."""
    suite_dir = Path(suite_dir)
    runs = []
    for run_dir in sorted(suite_dir.glob("*/*/seed*")):
        if not run_dir.is_dir() or run_dir.parts[-3] in SKIP_DIRS:
            continue
        config = read_json_or_none(run_dir / "config.json")
        status = read_json_or_none(run_dir / "status.json")
        if config is None and status is None:
            continue
        config = config or {}
        try:
            seed = int(run_dir.name.removeprefix("seed"))
        except ValueError:
            continue
        status = status or {"state": "unknown"}
        problem = _log_problem(run_dir / "evals.jsonl", status)
        if problem:  # never read as data: the run is left out and listed with its reason
            status = {**status, "state": "failed", "reason": problem}
        runs.append({
            "workload": run_dir.parts[-3], "label": run_dir.parts[-2], "seed": seed, "dir": run_dir,
            "config": config, "status": status, "unreadable_log": bool(problem),
            "machine": read_json_or_none(run_dir / "machine.json"),
        })
    return runs

def _log_problem(path: Path, status: dict) -> str | None:
    """Why a run's evaluation log cannot be read whole, or None. A running run may end in a line cut
    short (its write in progress); any other unreadable line loses evaluations."""
    bad, torn = unreadable_lines(path)
    if torn and status.get("state") == "running":
        bad = [n for n in bad if n != torn]
    if not bad:
        return None
    return (f"evals.jsonl line {bad[0]} is unreadable ({'cut short' if bad[0] == torn else 'not JSON'}): "
            "its evaluations are left out of this report; delete the run folder and run the suite again")

def run_budget(cfg: dict) -> int | None:
    """The workload's budget N of a run's config: its iters, or budget_iters for an extended baseline."""
    return cfg.get("budget_iters") or cfg.get("iters")


def evaluations_table(suite_dir: Path, runs: list[dict] | None = None) -> pd.DataFrame:
    """One tidy row per evaluation: run identity, step, images seen, metric, value, protocol."""
    runs = find_runs(suite_dir) if runs is None else runs
    rows = []
    for r in runs:
        if r.get("unreadable_log"):
            continue
        cfg = r["config"]
        iters, batch, budget = cfg.get("iters"), cfg.get("batch_size"), run_budget(cfg)
        for e in read_jsonl(r["dir"] / "evals.jsonl"):
            step = e.get("step")
            rows.append({
                "workload": r["workload"], "method_label": r["label"], "method": cfg.get("method", r["label"]),
                "seed": r["seed"], "dataset": cfg.get("dataset"), "resolution": cfg.get("resolution"),
                "arch": cfg.get("arch"), "iters": iters, "batch_size": batch, "step": step,
                "images_seen": step * batch if step is not None and batch else None,
                "fraction": step / budget if step is not None and budget else None,
                **{k: v for k, v in e.items() if k != "step"},
            })
    cols = ["workload", "method_label", "method", "seed", "dataset", "resolution", "arch", "iters", "batch_size",
            "step", "images_seen", "fraction", "metric", "value"]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    rest = [c for c in df.columns if c not in cols]
    return df[[c for c in cols if c in df.columns] + rest].sort_values(
        ["workload", "metric", "method_label", "seed", "step"], kind="stable").reset_index(drop=True)

def binned_steps(path: Path, iters: int, n_bins: int = N_BINS) -> pd.DataFrame:
    """steps.jsonl summarised in one pass (constant memory): per bin of the budget, the mean loss
    and MSE per timestep quartile, and the last lr and beta1."""
    width = max(1, math.ceil(iters / n_bins))
    keys = ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3")
    sums: dict[int, dict] = {}
    for row in iter_jsonl(path):
        step = row.get("step")
        if not isinstance(step, (int, float)) or step > iters:  # an extended baseline: to the budget
            continue
        b = int((step - 1) // width)
        acc = sums.setdefault(b, {"n": {k: 0 for k in keys}, "s": {k: 0.0 for k in keys}})
        for k in keys:
            v = row.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                acc["n"][k] += 1
                acc["s"][k] += v
        acc["step"] = step
        for k in ("lr", "beta1"):
            if isinstance(row.get(k), (int, float)):
                acc[k] = row[k]
    out = []
    for b in sorted(sums):
        acc = sums[b]
        out.append({"bin": b, "step": acc["step"], "lr": acc.get("lr"), "beta1": acc.get("beta1"),
                    **{k: acc["s"][k] / acc["n"][k] if acc["n"][k] else np.nan for k in keys}})
    return pd.DataFrame(out)

def fractions_table(evals: pd.DataFrame, runs: list[dict], fractions) -> pd.DataFrame:
    rows = []
    if evals.empty:
        return pd.DataFrame(rows)
    budgets = _budgets(runs)
    for (workload, metric, label), g in evals.groupby(["workload", "metric", "method_label"], sort=True):
        steps, values, _ = seed_curves(g)
        budget = budgets.get(workload) or float(np.nanmax(steps))
        for r in values_at_fractions(steps, values, budget, fractions):
            rows.append({"workload": workload, "metric": metric, "method_label": label, **r})
    return pd.DataFrame(rows)

def curves_table(evals: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean and std of every method's curve at the points where all its seeds have a value (an
    extended baseline's past the budget too)."""
    rows = []
    for (workload, metric, label), g in evals.groupby(["workload", "metric", "method_label"], sort=True):
        steps, values, _ = seed_curves(g)
        steps, values = complete_points(steps, values)
        for j, step in enumerate(steps):
            col = values[:, j]
            rows.append({"workload": workload, "metric": metric, "method_label": label, "step": int(step),
                         "mean": float(col.mean()), "std": float(col.std(ddof=1)) if len(col) > 1 else np.nan,
                         "n_seeds": len(col)})
    return pd.DataFrame(rows)

def _budgets(runs: list[dict]) -> dict[str, int]:
    out = {}
    for r in runs:
        it = run_budget(r["config"])
        if it:
            out[r["workload"]] = max(out.get(r["workload"], 0), int(it))
    return out

def method_order(labels, baseline: str | None) -> list[str]:
    labels = sorted(labels)
    if baseline in labels:
        labels.remove(baseline)
        labels.insert(0, baseline)
    return labels

def _num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}"

def fractions_display(df: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for _, r in df.iterrows():
        row = out.setdefault(r["method_label"], {"method": r["method_label"]})
        col = f"{100 * r['fraction']:g}% ({int(round(r['step']))} it)"
        if not np.isfinite(r["mean"]):
            row[col] = {"before first evaluation": "no eval yet"}.get(r.get("status"), "not all seeds")
        elif np.isfinite(r["std"]):
            row[col] = f"{r['mean']:.4g} ± {r['std']:.2g}"
        else:
            row[col] = f"{r['mean']:.4g}"
    return pd.DataFrame(list(out.values()))

def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no data)_"
    return df.to_markdown(index=False)

_LATEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}

def latex_escape(text) -> str:
    return "".join(_LATEX_ESCAPE.get(c, c) for c in str(text))

def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (no jinja2 needed)."""
    cols = list(df.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{{label}}}", r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in df.iterrows():
        lines.append(" & ".join(latex_escape(v) for v in row.tolist()) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)

#: how a method's loss weights are scaled (method_trace.json's weight_scale; see bench/core/spec.py)
WEIGHT_SCALE_TEXT = {"normalised": "normalised: mean 1 under its own t sampling", "source": "as its source writes them",
                     None: "-"}


def _weight_scale(run: dict) -> str:
    """The method's weight scale as the report states it (runs that predate the record: the harness
    then used every method's weights as written)."""
    trace = read_json_or_none(run["dir"] / "method_trace.json") if run.get("dir") else None
    if not trace or "weight_scale" not in trace:
        return "-" if "weighting" not in (run["config"].get("method_slots") or []) else WEIGHT_SCALE_TEXT["source"]
    return WEIGHT_SCALE_TEXT.get(trace["weight_scale"], str(trace["weight_scale"]))


def method_table(runs: list[dict]) -> pd.DataFrame:
    seen = {}
    for r in runs:
        cfg = r["config"]
        if r["label"] in seen or not cfg:
            continue
        params = cfg.get("method_resolved_params") or cfg.get("method_params") or {}
        seen[r["label"]] = {
            "label": r["label"], "method": cfg.get("method", ""),
            "slots": ", ".join(cfg.get("method_slots") or []) or "-",
            "hyperparameters": ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-",
            "loss weights": _weight_scale(r),
            "source": cfg.get("method_source", ""),
        }
    return pd.DataFrame(list(seen.values()))
