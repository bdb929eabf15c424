"""The report's tuning section: the tuning table (the metric at the tuning budget, mean over the tuning
seeds, per method and learning-rate factor, the chosen one marked) and the choices the headline used,
read from results/<suite>/tuning.json (bench/suite/tuning.py writes it and states the rule). Files
only, no torch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report.tables import read_json_or_none, to_markdown


def tuning_table(record: dict) -> pd.DataFrame:
    """One row per tuned method: its score at each factor ("diverged" where a run diverged), the choice."""
    rows = []
    for label, m in (record.get("methods") or {}).items():
        row = {"method": label, "base lr": f"{m.get('base_lr', float('nan')):g}"}
        for f in record.get("lr_factors") or []:
            key = f"{f:g}"
            mean = (m.get("means") or {}).get(key)
            cell = "-" if key not in (m.get("means") or {}) else "diverged" if mean is None else f"{mean:.4g}"
            row[f"lr x{key}"] = f"**{cell}**" if float(f) == float(m.get("factor", float("nan"))) else cell
        row["chosen lr"] = f"{m.get('lr', float('nan')):g} (x{m.get('factor', float('nan')):g})"
        margin, agree, n = choice_strength(m)
        row["margin"] = "-" if margin is None else f"{margin:.3g}"
        row["seeds preferring it"] = f"{agree} of {n}"
        rows.append(row)
    return pd.DataFrame(rows)


def choice_strength(m: dict) -> tuple[float | None, int, int]:
    """How firmly the tuning seeds chose: the next-best factor's mean minus the chosen one's (None when
    nothing else finished), and how many of the n tuning seeds score the chosen factor lowest on their own.
    With two seeds a small margin that one seed reverses is a near-tie, and a referee should read it so."""
    chosen = f"{m.get('factor', float('nan')):g}"
    means = {k: v for k, v in (m.get("means") or {}).items() if v is not None}
    others = [v for k, v in means.items() if k != chosen]
    margin = (min(others) - means[chosen]) if chosen in means and others else None
    values = {k: v for k, v in (m.get("values") or {}).items() if k in means}
    n = min((len(v) for v in values.values()), default=0)
    agree = sum(1 for i in range(n)
                if all(values[chosen][i] <= v[i] for k, v in values.items() if k != chosen)) if chosen in values else 0
    return margin, agree, n


def edge_choices(record: dict) -> list[str]:
    """Labels whose choice is the grid's smallest or largest factor: their best rate may lie beyond it."""
    factors = [float(f) for f in record.get("lr_factors") or []]
    if len(factors) < 2:
        return []
    return [label for label, m in (record.get("methods") or {}).items()
            if float(m.get("factor", float("nan"))) in (min(factors), max(factors))]


def tuning_lines(suite_dir: Path, info: dict) -> list[str]:
    """The section, or nothing for a suite without [tune]."""
    tune = info.get("tune")
    if not tune:
        return []
    record = read_json_or_none(Path(suite_dir) / "tuning.json")
    head = ["## Tuning", ""]
    if not record:
        return head + [f"The suite tunes by rule ([tune]) but no choice is recorded yet (no {Path(suite_dir).name}/"
                       "tuning.json): its tuning runs have not all finished.", ""]
    metric, seeds = record.get("metric"), record.get("seeds") or []
    lines = head + [
        f"Each tuned method's learning rate was chosen before the headline, by rule: its base rate x "
        f"{', '.join(f'{f:g}' for f in record.get('lr_factors') or [])}, trained on the tuning seeds "
        f"{', '.join(map(str, seeds))} (held out: the headline's seeds are others) to {record.get('budget')} iterations; "
        f"the score is the {metric} there, mean over the tuning seeds (lower is better; a diverged run loses); the "
        f"lowest wins, a tie goes to the factor closest to 1. Bold: the choice, which the headline uses. Tuning "
        "runs are in `tuning/`, never in the headline's tables. Margin: the next-best factor's mean minus the "
        "chosen one's; seeds preferring it: how many tuning seeds score the choice lowest on their own.", "",
        to_markdown(tuning_table(record)), ""]
    edge = edge_choices(record)
    if edge:
        lo, hi = min(record["lr_factors"]), max(record["lr_factors"])
        lines += [f"Chosen at the grid's edge (x{lo:g} or x{hi:g}): {', '.join(f'`{e}`' for e in edge)}. Their best "
                  "learning rate may lie beyond the grid; a wider `[tune] lr_factors` would say.", ""]
    strength = {label: choice_strength(m) for label, m in (record.get("methods") or {}).items()}
    close = [label for label, (margin, agree, n) in strength.items() if margin is not None and agree < n]
    if close:
        lines += [f"Not every tuning seed agrees with the choice for {', '.join(f'`{c}`' for c in close)}: for "
                  "them the chosen factor and another are near-equal at this budget, so the headline reads one "
                  "of near-equal settings.", ""]
    follow = record.get("follow") or tune.get("follow") or {}
    if follow:
        lines += ["Not tuned, at their leader's choice (a control must match what it controls): "
                  + ", ".join(f"`{k}` takes `{v}`'s" for k, v in follow.items()) + ".", ""]
    others = [m.get("label") for m in info.get("methods") or []
              if m.get("label") not in (record.get("methods") or {}) and m.get("label") not in follow]
    if others:
        lines += [f"Not tuned ([tune] methods leaves them out), at the suite's learning rate: "
                  f"{', '.join(f'`{o}`' for o in others)}.", ""]
    return lines
