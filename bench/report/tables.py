"""The report's data: the run folders of a results tree, the tidy evaluation table, curves and
metrics at fractions of the budget, and the table writers (Markdown, LaTeX). Files only, no torch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import iter_jsonl, unreadable_lines
from bench.report.curves import complete_points, values_at_fractions
from bench.report.speedup import lower_is_better
from bench.report.stats import seed_curves
from bench.report.style import metric_words
from bench.train import logs

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
        problem = _log_problem(run_dir / "evals.jsonl", status, config)
        if problem:  # never read as data: the run is left out and listed with its reason
            status = {**status, "state": "failed", "reason": problem}
        runs.append({
            "workload": run_dir.parts[-3], "label": run_dir.parts[-2], "seed": seed, "dir": run_dir,
            "config": config, "status": status, "unreadable_log": bool(problem),
            "machine": read_json_or_none(run_dir / "machine.json"),
        })
    return runs

def _log_problem(path: Path, status: dict, config: dict) -> str | None:
    """Why a run's evaluation log cannot be read whole, or None. A running run may end in a line cut
    short (its write in progress); any other unreadable line loses evaluations, and so does an
    evaluation a done or running run made (to its status's step) without its rows. Two different rows
    for one step and metric are refused too (which is the run's is unknown); a row logged twice
    alike is read once, with a note."""
    bad, torn = unreadable_lines(path)
    if torn and status.get("state") == "running":
        bad = [n for n in bad if n != torn]
    again = "its evaluations are left out of this report; delete the run folder and run the suite again"
    if bad:
        return f"evals.jsonl line {bad[0]} is unreadable ({'cut short' if bad[0] == torn else 'not JSON'}): {again}"
    rows, copies, conflict = logs.unique_rows(path, logs.EVAL_KEY)
    if conflict:
        return f"{conflict}: {again}"
    upto = status.get("step") if status.get("state") in ("done", "running") else None
    holes = logs.missing_evaluations(config, rows, upto) if isinstance(upto, int) else []
    if holes:
        return f"evals.jsonl has no row for the evaluation of {holes[0]} ({len(holes)} missing): {again}"
    if copies:
        print(f"note: {path}: {copies} evaluation row(s) logged twice read once (identical copies)", file=sys.stderr)
    return None

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
        for e in logs.unique_rows(r["dir"] / "evals.jsonl", logs.EVAL_KEY)[0]:  # each once (find_runs: no conflict)
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
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
                 "×": r"$\times$", "−": r"$-$", "≥": r"$\geq$", "≤": r"$\leq$"}

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

# ----------------------------------------------------------------------------------------------
# The compact LaTeX table of a paper: method, speed-up, final difference; bounds as footnotes.

_TEX_NOTES = {
    ">=": r"$\geq$: a lower bound, the baseline's curve (to {extend:g}$\times$ the budget) did not reach the "
          r"method's value on some seeds; no interval.",
    "<=": r"$\leq$: an upper bound, the method ended no better than the baseline's first evaluation on some "
          r"seeds; no interval.",
    "~": r"$\approx$: bounds both ways (seeds beyond the baseline's curve and before its first evaluation); "
         r"no interval.",
    "few": r"Fewer than 3 paired seeds: no interval.",
}


class _Notes:
    """Footnote marks a, b, ... in order of first use, one per kind of bound."""

    def __init__(self):
        self.used: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.used:
            self.used.append(text)
        return rf"\textsuperscript{{{chr(ord('a') + self.used.index(text))}}}"

    def lines(self) -> list[str]:
        return [rf"{{\footnotesize {self.mark(t)}\,{t}\par}}" for t in self.used]


def tex_number(v: float, decimals: int) -> str:
    """A number at a fixed precision with a typeset minus ($-$, not a hyphen); no "-0.00"."""
    text = f"{v:.{decimals}f}"
    if text.startswith("-") and float(text) != 0:
        return "$-$" + text[1:]
    return text.lstrip("-")


def _diff_decimals(rows: list[dict]) -> int:
    """One precision for the difference column: two significant digits of its narrowest interval's half
    width (of its largest value without intervals), 0 to 4 decimals."""
    halves = [(d.ci_high - d.ci_low) / 2 for d in (r["final_diff"] for r in rows) if d.ci_low is not None]
    halves = [h for h in halves if h > 0]
    if halves:
        return int(np.clip(1 - math.floor(math.log10(min(halves))), 0, 4))
    means = [abs(r["final_diff"].mean) for r in rows if r["final_diff"].mean]
    return int(np.clip(2 - math.floor(math.log10(max(means))), 0, 4)) if means else 2


def _tex_speedup(e, notes: _Notes) -> str:
    if e.speedup is None:
        return "--"
    x = rf"{e.speedup:.2f}\times"
    if e.lower_bound and e.upper_bound:
        return rf"$\approx {x}$" + notes.mark(_TEX_NOTES["~"])
    if e.lower_bound:
        return rf"$\geq {x}$" + notes.mark(_TEX_NOTES[">="].format(extend=e.extend))
    if e.upper_bound:
        return rf"$\leq {x}$" + notes.mark(_TEX_NOTES["<="])
    if e.ci_low is None:
        return f"${x}$" + notes.mark(_TEX_NOTES["few"])
    return rf"${x}$ [{e.ci_low:.2f}, {e.ci_high:.2f}]"


def _tex_difference(d, decimals: int, notes: _Notes) -> str:
    if d.mean is None:
        return "--"
    point = tex_number(d.mean, decimals)
    if d.ci_low is None:
        return point + notes.mark(_TEX_NOTES["few"])
    return f"{point} [{tex_number(d.ci_low, decimals)}, {tex_number(d.ci_high, decimals)}]"


def latex_speedup(rows: list[dict], *, metric: str, workload: str, look, confidence: float, label: str,
                  with_speedup: bool = True) -> str:
    """The paper's table of one workload and metric (booktabs): per method the baseline-equivalent
    speed-up at the budget and the paired final difference, each with its t-interval; the controls
    under a rule; bounds marked and explained in footnotes. `look` names the methods (bench/report/style.py)."""
    notes, decimals = _Notes(), _diff_decimals([r for r in rows if not r["is_baseline"]])
    n_seeds = max((r["final_diff"].n for r in rows), default=0)
    better = "negative" if lower_is_better(metric) else "positive"
    head = ["Method"] + (["Speed-up"] if with_speedup else []) + ["Final difference"]
    body = {False: [], True: []}
    for r in rows:
        if r["is_baseline"]:
            continue
        name = "A/A control" if r["method_label"].startswith("A/A") else look.name(r["method_label"])
        cells = [latex_escape(name)] + ([_tex_speedup(r["equiv"], notes)] if with_speedup else []) + \
            [_tex_difference(r["final_diff"], decimals, notes)]
        body[bool(r["is_control"])].append(" & ".join(cells) + r" \\")
    base = latex_escape(look.name(look.baseline))
    what = (f"Speed-up over {base} (iterations the baseline needs to match the method at the budget, over the "
            "budget) and final " if with_speedup else "Final ")
    caption = (what + f"{latex_escape(metric_words(metric))} difference, method $-$ {base} (paired over {n_seeds} "
               f"seeds; {better} is better), on {latex_escape(workload)}. Brackets: {100 * confidence:g}\\% t-intervals.")
    # \small and narrower column gaps: a column of 3.3 in holds a long name and two intervals
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\",
             r"\midrule", *body[False]]
    if body[True]:
        lines += [r"\midrule", *body[True]]
    lines += [r"\bottomrule", r"\end{tabular}", *notes.lines(), r"\end{table}", ""]
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
