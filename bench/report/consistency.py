"""The consistency phenomenon's measures and report (numpy, pandas, matplotlib; never torch).

Xu et al. 2024 start from an observation: diffusion models trained from different seeds, even with
different architectures, map the same noise to nearly the same image, and they agree most at the
high-noise end of the chain. `run_bench.py consistency` (bench/tools/consistency.py) samples and
queries the models; this module holds the arithmetic and writes the tables, figures and report.

Every distance between two models comes with its reference level, so a number says something on its
own:
- images from the same noise: mean squared pixel difference (pixels in [0, 1]) over the N image
  pairs (a_i, b_i), against the mean over the N (N - 1) pairs (a_i, b_j), i != j, of different noise.
  agreement = 1 - MSE_same / MSE_different: 1 for identical outputs, about 0 when the noise says
  nothing about which image a model draws (two unrelated networks).
- the same in the metric's feature space, as cosine similarity (same noise vs different noise).
- per timestep t, the networks' x0 predictions for the same x_t: agreement against different inputs
  (as above) and against the truth: 1 - MSE(a, b) / (MSE(a, x0) + MSE(b, x0)), which is 1 when the
  two make the same error and about 0 when their errors are unrelated. At a fixed t an x0 error is
  sqrt((1 - alpha_bar) / alpha_bar) times the eps error, so this second reading is the same in x0
  and eps space.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fileio import atomic_write_bytes, read_json
from bench.report.figures import (
    figure_consistency_grid,
    figure_consistency_matrix,
    figure_consistency_over_t,
    figure_consistency_over_training,
)

TABLES = ("pairs", "over_t", "errors_over_t", "over_training")


# --------------------------------------------------------------------------- arithmetic


def pixel_distances(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean squared difference per pixel over same-index pairs, over different-index pairs) of two
    sets of N flattened images [N, P] (N >= 2). The different-index mean is exact over all
    N (N - 1) pairs, from sums (no N x N x P array)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n, p = a.shape
    if b.shape != a.shape or n < 2:
        raise ValueError(f"need two sets of the same shape with at least 2 items, got {a.shape} and {b.shape}")
    same = ((a - b) ** 2).sum(axis=1)
    every = n * (a**2).sum() + n * (b**2).sum() - 2.0 * float(a.sum(axis=0) @ b.sum(axis=0))
    different = max(0.0, (every - same.sum()) / (n * (n - 1)))  # cancellation can leave -1e-12
    return float(same.mean() / p), float(different / p)


def cosines(fa: np.ndarray, fb: np.ndarray) -> tuple[float, float]:
    """(mean cosine similarity of same-index feature pairs, of different-index pairs); NaN where a
    feature vector is zero."""
    fa, fb = np.asarray(fa, dtype=np.float64), np.asarray(fb, dtype=np.float64)
    n = len(fa)
    with np.errstate(invalid="ignore", divide="ignore"):
        ua = fa / np.linalg.norm(fa, axis=1, keepdims=True)
        ub = fb / np.linalg.norm(fb, axis=1, keepdims=True)
    same = (ua * ub).sum(axis=1)
    every = float(ua.sum(axis=0) @ ub.sum(axis=0))
    return float(same.mean()), float((every - same.sum()) / (n * (n - 1)))


def agreement(mse_same: float, mse_reference: float) -> float:
    """1 - MSE_same / MSE_reference; 1 for identical outputs (also when the reference is 0), NaN when
    only the reference is 0."""
    if mse_same == 0.0:
        return 1.0
    return 1.0 - mse_same / mse_reference if mse_reference > 0 else math.nan


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]; infinite for identical images."""
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def pair_row(a: np.ndarray, b: np.ndarray, fa: np.ndarray | None, fb: np.ndarray | None) -> dict:
    """Every same-noise / different-noise measure of two models' images [N, P] in [0, 1] (and their
    features), as one table row."""
    same, different = pixel_distances(a, b)
    row = {"rmse_same": math.sqrt(same), "rmse_different": math.sqrt(different), "psnr_same": psnr(same),
           "psnr_different": psnr(different), "agreement": agreement(same, different)}
    if fa is not None and fb is not None:
        row["cosine_same"], row["cosine_different"] = cosines(fa, fb)
    return row


def prediction_row(a: np.ndarray, b: np.ndarray, ea: np.ndarray, eb: np.ndarray, eps: np.ndarray) -> dict:
    """Two models' predictions [M, P] for the same inputs: x0 as the sampler uses it (a, b) and eps
    (ea, eb, the truth eps), against each other, different inputs and the truth."""
    same, different = pixel_distances(a, b)
    same_eps, different_eps = pixel_distances(ea, eb)
    err = float(((ea - eps) ** 2).mean()) + float(((eb - eps) ** 2).mean())
    return {"rmse_same": math.sqrt(same), "rmse_different": math.sqrt(different),
            "agreement_inputs": agreement(same, different), "agreement_inputs_eps": agreement(same_eps, different_eps),
            "agreement_truth": agreement(same_eps, err)}


def summarise_pairs(pairs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Mean, min and max over the distinct model pairs (a != b) of each measure (per `by` group)."""
    off = pairs[pairs.model_a != pairs.model_b]
    cols = [c for c in ("rmse_same", "rmse_different", "psnr_same", "agreement", "agreement_inputs",
                        "agreement_inputs_eps", "agreement_truth", "cosine_same", "cosine_different") if c in off]
    if off.empty:
        return pd.DataFrame()
    if not by:
        return off[cols].agg(["mean", "min", "max"])
    return off.groupby(by)[cols].agg(["mean", "min", "max"])


# --------------------------------------------------------------------------- report


def write_report(out_dir: str | Path) -> Path:
    """report.md, tables/*.md and figures/ of a consistency folder from its tables/*.csv,
    consistency.json and samples.npz (what bench.tools.consistency wrote)."""
    out = Path(out_dir)
    meta = read_json(out / "consistency.json")
    tab, fig_dir = out / "tables", out / "figures"
    t = {name: pd.read_csv(tab / f"{name}.csv") for name in TABLES if (tab / f"{name}.csv").is_file()}
    labels = [m["label"] for m in meta["models"]]
    lines = [f"# Consistency: {meta['name']}", "", *_header(meta), ""]
    training = t.get("over_training")
    initial = training[training.step == 0] if training is not None else None
    lines += _matrix_section(meta, t.get("pairs"), labels, fig_dir, initial)
    lines += _over_t_section(meta, t.get("over_t"), t.get("errors_over_t"), fig_dir)
    lines += _over_training_section(meta, t.get("over_training"), fig_dir)
    grid = out / "samples.npz"
    if grid.is_file():
        with np.load(grid) as z:
            stem = figure_consistency_grid(z["images"], labels, fig_dir)
        lines += ["## Samples from the same noise", "",
                  f"One row per model, one column per noise (the first {meta['grid_columns']} of the set).", "",
                  f"![grid](figures/{stem}.png)", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _header(meta: dict) -> list[str]:
    s = meta["sampling"]
    out = [f"{len(meta['models'])} models of {meta['workload']}, each its run's EMA weights at its last checkpoint:", "",
           "| model | run | step |", "|---|---|---|"]
    out += [f"| {m['label']} | {m['run']} | {m['step']} |" for m in meta["models"]]
    out += ["", f"Sampling: {s['sampler']}, {s['steps']} steps ({s['spacing']} spacing), noise seed {s['noise_seed']}, "
            f"{meta['num_images']} images per model; features: {meta['features'] or 'none'}. Made by "
            f"`{meta['command']}`."]
    seeds = [(m["seed"], m["arch"]) for m in meta["models"]]
    if len(set(seeds)) < len(seeds):  # one seed and architecture: the same initial network
        out += ["", "Models of one seed share their initial weights, data order and noise draws (paired seeds): "
                    "their agreement includes what they share; only models of different seeds measure the "
                    "paper's claim across initialisations."]
    steps = sorted({m["step"] for m in meta["models"]})
    if len(steps) > 1:
        out += ["", f"The models stand at different steps ({', '.join(map(str, steps))}); the section over "
                    "training compares them at the same steps."]
    return out


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def _untrained_line(meta: dict, initial: pd.DataFrame | None) -> list[str]:
    """The same pairs' agreement before training (step 0 of the table over training)."""
    if initial is None or initial.empty:
        return []
    s = summarise_pairs(initial)
    if s.empty:
        return []
    if len({(m["seed"], m["arch"]) for m in meta["models"]}) == 1:
        return ["Before training these models were one network (one seed): the step-0 agreement is 1 by construction.", ""]
    return [f"Reference before training: the same models' initial networks, sampled from the same noise, agree at "
            f"{_fmt(s.loc['mean'].agreement)} (min {_fmt(s.loc['min'].agreement)}, max {_fmt(s.loc['max'].agreement)}): "
            "the part of the agreement the shared noise gives through the sampler, whatever the network learned.", ""]


def _matrix_section(meta: dict, pairs: pd.DataFrame | None, labels: list[str], fig_dir: Path,
                    initial: pd.DataFrame | None = None) -> list[str]:
    if pairs is None or pairs.empty:
        return []
    out = ["## Same noise, different models", "",
           "Per pair: RMSE of pixels in [0, 1] for the same noise (different noise in brackets, the reference "
           "level), agreement = 1 - MSE same / MSE different"
           + (", feature cosine same (different)." if "cosine_same" in pairs else "."), ""]
    s = summarise_pairs(pairs)
    if not s.empty:
        m = s.loc["mean"]
        out += [f"Over the {len(labels) * (len(labels) - 1) // 2} pairs of distinct models: RMSE {_fmt(m.rmse_same)} for the "
                f"same noise against {_fmt(m.rmse_different)} for different noise (PSNR {_fmt(m.psnr_same, 1)} dB); "
                f"agreement {_fmt(m.agreement)} (min {_fmt(s.loc['min'].agreement)}, max {_fmt(s.loc['max'].agreement)})"
                + (f"; feature cosine {_fmt(m.cosine_same)} against {_fmt(m.cosine_different)}." if "cosine_same" in s
                   else "."), ""]
        out += _untrained_line(meta, initial)
    out += ["| model a | model b | RMSE same (different) | PSNR same dB | agreement | cosine same (different) |",
            "|---|---|---|---|---|---|"]
    for r in _upper(pairs, labels):
        cos = f"{_fmt(r.cosine_same)} ({_fmt(r.cosine_different)})" if hasattr(r, "cosine_same") else "-"
        out.append(f"| {r.model_a} | {r.model_b} | {_fmt(r.rmse_same)} ({_fmt(r.rmse_different)}) | "
                   f"{_fmt(r.psnr_same, 1)} | {_fmt(r.agreement)} | {cos} |")
    stem = figure_consistency_matrix(pairs, labels, fig_dir)
    return out + ["", "The diagonal's different-noise RMSE is each model's own diversity.", "",
                  f"![matrix](figures/{stem}.png)", ""]


def _upper(pairs: pd.DataFrame, labels: list[str]):
    """Rows of distinct pairs, a before b in the models' order."""
    rank = {m: k for k, m in enumerate(labels)}
    keep = pairs[[rank[a] < rank[b] for a, b in zip(pairs.model_a, pairs.model_b)]]
    return keep.itertuples()


def _over_t_section(meta: dict, over_t: pd.DataFrame | None, errors: pd.DataFrame | None, fig_dir: Path) -> list[str]:
    if over_t is None or over_t.empty:
        return []
    s = summarise_pairs(over_t, ["t"])
    T = meta["T"]
    clip = "clamped to [-1, 1] as the sampler does" if meta["sampling"]["clip_x0"] else "unclamped, as the sampler uses it"
    out = ["## Per timestep: the networks' predictions for the same x_t", "",
           f"{meta['x0_images']} {meta['x0_split']} images, one fixed noise each; x_t at {len(s)} timesteps (t = 0 "
           "the least noisy). Agreement against the truth: 1 - MSE(a, b) / (MSE(a, truth) + MSE(b, truth)), 1 when the "
           "two make the same error and 0 when their errors are unrelated (the same in x0 and eps space); against "
           f"different inputs, as for samples, for x0 ({clip}) and for eps. Means over pairs, (min, max) for the first. "
           "RMSEs in pixels in [0, 1] for x0, in units of the noise for eps.", "",
           "| t | t / T | agreement vs truth | x0 vs inputs | eps vs inputs | x0 RMSE between models "
           "| x0 RMSE to truth | eps RMSE to truth |", "|---|---|---|---|---|---|---|---|"]
    err = errors.groupby("t")[["rmse_truth", "eps_rmse_truth"]].mean() if errors is not None and not errors.empty else None
    for t, r in s.iterrows():
        e = err.loc[t] if err is not None and t in err.index else {}
        out.append(f"| {t} | {t / T:.2f} | {_fmt(r[('agreement_truth', 'mean')])} ({_fmt(r[('agreement_truth', 'min')])}, "
                   f"{_fmt(r[('agreement_truth', 'max')])}) | {_fmt(r[('agreement_inputs', 'mean')])} | "
                   f"{_fmt(r[('agreement_inputs_eps', 'mean')])} | {_fmt(r[('rmse_same', 'mean')])} | "
                   f"{_fmt(e.get('rmse_truth'))} | {_fmt(e.get('eps_rmse_truth'))} |")
    hi, lo = s[s.index >= 0.8 * T], s[s.index < 0.2 * T]
    if len(hi) and len(lo):
        out += ["", "Means over the timesteps at t >= 0.8 T against t < 0.2 T: agreement vs truth "
                f"{_fmt(hi[('agreement_truth', 'mean')].mean())} against {_fmt(lo[('agreement_truth', 'mean')].mean())}; "
                f"x0 vs inputs {_fmt(hi[('agreement_inputs', 'mean')].mean())} against "
                f"{_fmt(lo[('agreement_inputs', 'mean')].mean())}; eps vs inputs "
                f"{_fmt(hi[('agreement_inputs_eps', 'mean')].mean())} against {_fmt(lo[('agreement_inputs_eps', 'mean')].mean())}."]
    stem = figure_consistency_over_t(s, err, T, fig_dir)
    return out + ["", f"![over t](figures/{stem}.png)", ""]


def _over_training_section(meta: dict, over: pd.DataFrame | None, fig_dir: Path) -> list[str]:
    head = ["## Over training: the models' saved evaluation samples", ""]
    if over is None or over.empty:
        return head + [meta.get("over_training_note") or "No evaluation samples in common.", ""]
    s = summarise_pairs(over, ["step"])
    out = head + [f"Each evaluation's samples (samples/step<k>.npz: the run's fixed evaluation noise, "
                  f"{meta['over_training_images']} images): same-noise agreement between the models at each step, "
                  "mean over pairs (min, max). Step 0: the models' initial networks (rebuilt from their seeds) sampled "
                  "from the same noise: what the shared noise gives before any training, the level trained "
                  "agreement is to be read against.", "",
                  "| step | agreement | RMSE same | RMSE different | cosine same | cosine different |",
                  "|---|---|---|---|---|---|"]
    for step, r in s.iterrows():
        cos = [r.get(("cosine_same", "mean")), r.get(("cosine_different", "mean"))]
        out.append(f"| {step} | {_fmt(r[('agreement', 'mean')])} ({_fmt(r[('agreement', 'min')])}, "
                   f"{_fmt(r[('agreement', 'max')])}) | {_fmt(r[('rmse_same', 'mean')])} | "
                   f"{_fmt(r[('rmse_different', 'mean')])} | {_fmt(cos[0])} | {_fmt(cos[1])} |")
    if meta.get("over_training_note"):
        out += ["", meta["over_training_note"]]
    stem = figure_consistency_over_training(s, fig_dir)
    return out + ["", f"![over training](figures/{stem}.png)", ""]
