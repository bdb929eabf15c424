"""The report's sample grids, from the images each evaluation saved (`[eval] save_samples = true`:
samples/step<k>.npz, uint8 NHWC): no sampling, no torch. Image i of every run comes from the same
fixed noise (bench/eval/sampling.py), so the rows of a grid are directly comparable."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bench.report.figures import figure_image_grid, safe_filename

COLUMNS = 10  # noise indices in the grid of methods
ROWS = 4      # noise indices in each method's grid over training
MAX_STEPS = 12  # evaluation steps shown in a grid over training
SAVED = re.compile(r"step(\d+)\.npz")


def saved_samples(run_dir: Path) -> dict[int, Path]:
    """step -> samples file of an evaluation (not a second sampler's or a final set's)."""
    return {int(m.group(1)): p for p in sorted((Path(run_dir) / "samples").glob("step*.npz"))
            if (m := SAVED.fullmatch(p.name))}


def _first(path: Path, n: int) -> np.ndarray:
    with np.load(path) as z:
        return z["arr_0"][:n]


def sample_lines(w_runs: list[dict], workload: str, budget: int, order: list[str], fig_dir: Path,
                 fig_link) -> list[str]:
    """The workload's sample grids (methods at the budget; each method over training) as report lines."""
    first = {}  # each method's lowest seed that saved samples
    for r in sorted(w_runs, key=lambda r: r["seed"]):
        if r["label"] not in first and saved_samples(r["dir"]):
            first[r["label"]] = r
    head = ["### Samples", ""]
    if not first:
        return head + ["No run of this workload saved its evaluation samples (`save_samples = true` in the suite's "
                       "[eval] table writes them, at no extra sampling cost).", ""]
    labels = [m for m in order if m in first] + sorted(set(first) - set(order))
    at_budget = [m for m in labels if budget in saved_samples(first[m]["dir"])]
    seeds = sorted({r["seed"] for r in first.values()})
    which = f"Seed {seeds[0]} of each method" if len(seeds) == 1 else "Each method's lowest seed that saved samples"
    out = head + [f"{which}, from its evaluations' saved images (no extra sampling); image i of every run starts "
                  "from the same noise, so the columns are directly comparable."]
    if at_budget:
        grid = [_first(saved_samples(first[m]["dir"])[budget], COLUMNS) for m in at_budget]
        n = min(len(g) for g in grid)
        stem = figure_image_grid(np.stack([g[:n] for g in grid]), [f"{m}/seed{first[m]['seed']}" for m in at_budget],
                                 [f"noise {c}" for c in range(n)], fig_dir, f"samples_{safe_filename(workload)}")
        out += ["", f"At the budget ({budget} iterations), one row per method:", "",
                f"![samples at the budget]({fig_link(stem)}.png)"]
    for m in labels:
        steps = saved_samples(first[m]["dir"])
        shown = sorted(steps)
        if len(shown) > MAX_STEPS:  # evenly spread, first and last kept
            shown = sorted({shown[round(i * (len(shown) - 1) / (MAX_STEPS - 1))] for i in range(MAX_STEPS)})
        grid = [_first(steps[s], ROWS) for s in shown]
        n = min(len(g) for g in grid)
        images = np.stack([g[:n] for g in grid], axis=1)  # rows: noise index, columns: step
        stem = figure_image_grid(images, [f"noise {i}" for i in range(n)], [f"step {s}" for s in shown], fig_dir,
                                 f"samples_{safe_filename(workload)}_{safe_filename(m)}")
        out += ["", f"`{m}` over training (seed {first[m]['seed']}):", "", f"![{m} over training]({fig_link(stem)}.png)"]
    return out + [""]
