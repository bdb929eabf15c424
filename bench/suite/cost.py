"""The dry run's cost model (:func:`estimate_cost`, :func:`describe_plan`), deliberately simple:

- training: ``iters * batch_size`` images at a throughput (images/s of the whole run, all its GPUs),
  the first of: a measurement of the GPU check (``run --dry-run --gpu-check gpu_check.json``: the
  network's images/s per GPU at the run's precision x its GPUs); the suite's [cost]
  ``arch_images_per_s`` / ``train_images_per_s``; on GPUs (``device_tflops``) FLOPs, 3 x the forward's
  per image (bench/suite/peaks.py) at the training precision's peak x ``utilization`` x GPUs; the
  built-in table :data:`TRAIN_IMAGES_PER_S` (measured on the project's 2-core CPU), scaled by
  ``(reference resolution / resolution)^2`` for other resolutions. A stated throughput above the
  device's dense peak is refused when the suite loads (:func:`over_peak`);
- sampling: every evaluation generates ``num_images`` images with ``sampler_steps`` network
  evaluations each; one network evaluation without backward costs ``1 / forward_ratio`` of a
  training image (default 2.5, measured for unet-tiny on the CPU; 3 is the textbook figure);
- on GPUs (a [cost] table with ``device_tflops``): evaluation is priced from FLOPs instead:
  sampled images x sampler steps x the network's forward FLOPs (:data:`FORWARD_GFLOP`, counted
  with torch.utils.flop_counter, scaled by the pixel count) at the peak rate of the sampling
  precision (eval ``sample_precision``, default tf32) x ``utilization`` (default 0.35) x the run's
  GPUs (evaluation is sharded over them), plus Inception's forward (:data:`INCEPTION_GFLOP`, in
  fp32) and clean-fid's resize on the CPUs (``resize_images_per_s`` for the whole node) for every
  generated image of an FID / KID metric; a GPU check's file replaces the peaks with its device's
  (bench/suite/peaks.py) and the FLOP rates with its measured sampling and Inception rates;
- fixed costs: ``startup_s`` per run (process start, data loading), ``eval_overhead_s`` per
  evaluation (feature extraction of the generated images on a CPU, metric arithmetic), and ``setup_s``
  once per suite (the evaluator's first-time setup: reference statistics, or training a proxy
  feature extractor that is not shipped; cached under $DIFFBENCH_CACHE/eval, by default
  ~/.cache/diffbench/eval, afterwards, so counted only
  while no run of the suite has finished).
Evaluations happen every ``eval.every`` iterations and at the end (as bench.train.loop does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from bench.core.eval_steps import eval_steps, evaluates, noise_sets_at
from bench.errors import ConfigError
from bench.eval.spec import DEFAULTS
from bench.suite.grid import RunSpec, Suite
from bench.suite.peaks import (  # noqa: F401
    FORWARD_GFLOP,
    TRAIN_FLOP_FACTOR,
    device_peaks,
    forward_gflop,
    over_peak,
    peak_tflops,
    run_resolution,
    stated_throughput,
    train_precision,
)
from bench.suite.slurm import slurm_parameters

#: training throughput (images/s) by architecture at a reference resolution, on the project's
#: 2-core CPU (unet-tiny measured with batch 32, forward + backward + Adam step; ddpm-unet
#: extrapolated from its FLOPs). A suite's [cost] table overrides these.
TRAIN_IMAGES_PER_S = {
    "unet-tiny": (16, 450.0),
    "ddpm-unet": (32, 6.0),
}

DEFAULT_FORWARD_RATIO = 2.5

#: clean-fid's Inception v3 forward at 299 x 299 (GFLOP; 5.7 G multiply-adds).
INCEPTION_GFLOP = 11.5

DEFAULT_UTILIZATION = 0.35

DEFAULT_RESIZE_IMAGES_PER_S = 1000.0

DEFAULT_STARTUP_S = 5.0

DEFAULT_EVAL_OVERHEAD_S = 1.0


@dataclass
class RunCost:
    train_images: int
    eval_points: int
    sample_images: int
    network_evals: int
    train_s: float
    sample_s: float  # the sampler's network evaluations
    overhead_s: float  # startup and the per-evaluation overhead
    feature_s: float = 0.0  # Inception features and resize of the generated images (GPU pricing)
    eval_overhead_s: float = 0.0  # the part of overhead_s that is evaluation's

    @property
    def eval_s(self) -> float:
        """Everything an evaluation costs: sampling, features, its overhead."""
        return self.sample_s + self.feature_s + self.eval_overhead_s

    @property
    def total_s(self) -> float:
        return self.train_s + self.sample_s + self.feature_s + self.overhead_s


def train_throughput(suite: Suite, run: RunSpec) -> float:
    """Training images per second of a whole run (all its GPUs; see the module docstring)."""
    arch, cfg, gpus = run.config["arch"], run.config, int(run.config.get("gpus", 1))
    res = run_resolution(cfg)
    measured = _measured(suite.cost, "train", arch, train_precision(cfg), res)
    if measured:
        return measured * gpus
    stated = stated_throughput(suite.cost, arch)
    if stated:
        return stated
    gflop = forward_gflop(arch, res) if res else None
    rates = _peaks(suite.cost)
    if rates and gflop:
        use = float(suite.cost.get("utilization", DEFAULT_UTILIZATION))
        return peak_tflops(rates, train_precision(cfg)) * 1e3 * use * gpus / (TRAIN_FLOP_FACTOR * gflop)
    ref_res, ips = TRAIN_IMAGES_PER_S.get(arch, (16, 100.0))
    return ips * (ref_res / (res or ref_res)) ** 2


def run_cost(suite: Suite, run: RunSpec) -> RunCost:
    cfg = run.config
    every, budget = cfg.get("eval_every", 0), cfg.get("budget_iters") or None
    at = eval_steps(cfg["iters"], every, budget) if evaluates(cfg.get("eval"), every) else []
    points = len(at)
    ev = {**DEFAULTS, **{k: v for k, v in (cfg.get("eval") or {}).items() if v is not None}}
    T = cfg.get("T", 1000)
    steps = ev["sampler_steps"] or (T if ev["sampler"] == "ddpm" else min(50, T))
    sets = sum(noise_sets_at(s, cfg["iters"], budget, int(ev.get("noise_sets") or 1)) for s in at)
    n_img = int(ev["num_images"]) * sets + (int(ev.get("final_num_images") or 0) if points else 0)
    nfe = n_img * int(steps)
    second = ev.get("sampler2") if points else None
    if second:  # one set at the budget with the second sampler
        n_img += int(ev["num_images"])
        nfe += int(ev["num_images"]) * int(second.get("sampler_steps") or min(50, T))
    nfe *= 2 if float(ev.get("guidance_scale", 1.0)) != 1.0 else 1  # guided: c and u
    ips = train_throughput(suite, run)
    forward_ratio = float(suite.cost.get("forward_ratio", DEFAULT_FORWARD_RATIO))
    eval_overhead = points * float(suite.cost.get("eval_overhead_s", DEFAULT_EVAL_OVERHEAD_S))
    overhead = float(suite.cost.get("startup_s", DEFAULT_STARTUP_S)) + eval_overhead
    train_images = cfg["iters"] * cfg["batch_size"]
    sample_s, feature_s = nfe / (ips * forward_ratio), 0.0
    res = run_resolution(cfg)
    gflop = forward_gflop(cfg["arch"], res) if res else None
    if _peaks(suite.cost) and gflop is not None:
        sample_s, feature_s = _gpu_eval_seconds(suite.cost, ev, nfe, n_img, gflop, int(cfg.get("gpus", 1)),
                                                (cfg["arch"], res))
    return RunCost(train_images, points, n_img, nfe, train_images / ips, sample_s, overhead, feature_s, eval_overhead)


def _gpu_eval_seconds(cost: dict, ev: dict, nfe: int, n_img: int, gflop: float, gpus: int,
                      workload: tuple[str, int]) -> tuple[float, float]:
    """(sampling, features) seconds of an evaluation plan on `gpus` GPUs, from FLOPs at the peak rates
    x utilization, or from the GPU check's measured rates; features only for Inception metrics (the
    proxy's are free)."""
    rates, use = _peaks(cost), float(cost.get("utilization", DEFAULT_UTILIZATION))
    precision = ev.get("sample_precision") or "tf32"
    rate = lambda p: peak_tflops(rates, p) * 1e12 * use * gpus  # noqa: E731
    measured = _measured(cost, "sample", *workload[:1], precision, workload[1])  # network evaluations/s per GPU
    sample_s = nfe / (measured * gpus) if measured else nfe * gflop * 1e9 / rate(precision)
    feature_s = 0.0
    if {"fid", "kid"} & set(ev["metrics"]):
        inception = (cost.get("measured") or {}).get("inception_images_per_s")
        feature_s = (n_img / (inception * gpus) if inception else n_img * INCEPTION_GFLOP * 1e9 / rate("fp32")) \
            + n_img / float(cost.get("resize_images_per_s", DEFAULT_RESIZE_IMAGES_PER_S))
    return sample_s, feature_s


# -- a GPU check's measurements (python -m bench.gpu_check writes gpu_check.json) ---------------------

def _peaks(cost: dict) -> dict | None:
    """The peak TFLOP/s the plan prices with: the checked device's, else the suite's device_tflops."""
    return (cost.get("measured") or {}).get("peaks") or cost.get("device_tflops")


def _measured(cost: dict, kind: str, arch: str, precision: str, res: int | None) -> float | None:
    """A measured rate per GPU ("train": images/s, "sample": network evaluations/s) of `arch` at
    `precision`, scaled from the measured resolution to `res` by the pixel count (as FLOPs scale)."""
    rows = [r for r in (cost.get("measured") or {}).get(kind, []) if (r["arch"], r["precision"]) == (arch, precision)]
    if not rows:
        return None
    row = min(rows, key=lambda r: abs(math.log(r["resolution"] / res)) if res else 0.0)  # the nearest resolution
    return row["rate"] * (row["resolution"] / res) ** 2 if res else row["rate"]


def read_gpu_check(path: str | Path) -> dict:
    """The rates a dry run prices from, read from a GPU check's file: {"file", "device", "peaks",
    "train": [...], "sample": [...], "inception_images_per_s"}. A file that is not one is refused."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        env = data["environment"]
        train = [{"arch": r["network"], "precision": r["precision"], "resolution": int(r["resolution"]),
                  "rate": float(r["images_per_s"])} for r in data["throughput"]
                 if "images_per_s" in r and not r.get("variant")]  # not channels_last's other way, not compile
        sample = [{"arch": r["network"], "precision": r["precision"], "resolution": int(r["resolution"]),
                   "rate": float(r["network_evals_per_s"])} for r in data.get("sampling", []) if "network_evals_per_s" in r]
        inception = (data.get("inception") or {}).get("images_per_s")
    except OSError as exc:
        raise ConfigError(f"--gpu-check {path}: cannot be read ({exc.strerror}); give the gpu_check.json that "
                          "python -m bench.gpu_check wrote") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--gpu-check {path}: not a GPU check's file ({type(exc).__name__}: {exc}); give the "
                          "gpu_check.json that python -m bench.gpu_check wrote") from None
    if not all(math.isfinite(r["rate"]) and r["rate"] > 0 for r in train + sample):
        raise ConfigError(f"--gpu-check {path}: a measured rate is not a positive number; run the check again")
    device = env.get("gpu") or env.get("device", "?")
    return {"file": str(path), "device": device, "peaks": device_peaks(device) if env.get("gpu") else None,
            "train": train, "sample": sample, "inception_images_per_s": float(inception) if inception else None}


def with_gpu_check(suite: Suite, path: str | Path) -> Suite:
    """`suite` priced from a GPU check's measurements (:func:`read_gpu_check`) where they cover a run,
    and from FLOPs at the checked device's peaks elsewhere."""
    measured = read_gpu_check(path)
    if not (measured["train"] or measured["sample"]):
        raise ConfigError(f"--gpu-check {path}: holds no measured rate (every part failed or was cut); run "
                          "python -m bench.gpu_check again")
    return replace(suite, cost={**suite.cost, "measured": measured})


@dataclass
class CostEstimate:
    runs: list[tuple[RunSpec, RunCost]]
    setup_s: float = 0.0  # once per suite (evaluator setup)

    @property
    def train_images(self) -> int:
        return sum(c.train_images for _, c in self.runs)

    @property
    def sample_images(self) -> int:
        return sum(c.sample_images for _, c in self.runs)

    @property
    def network_evals(self) -> int:
        return sum(c.network_evals for _, c in self.runs)

    @property
    def total_s(self) -> float:
        return self.setup_s + sum(c.total_s for _, c in self.runs)


def estimate_cost(suite: Suite, runs: list[RunSpec] | None = None) -> CostEstimate:
    return CostEstimate([(r, run_cost(suite, r)) for r in (suite.runs() if runs is None else runs)],
                        float(suite.cost.get("setup_s", 0.0)))


def format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def runtime_summary(train: dict) -> str:
    """Where and how the runs execute: the [train] table's device, processes and fast path."""
    # torch on first use: a dry run needs no torch
    from bench.core.config import TrainConfig

    c = {**TrainConfig().to_dict(), **train}
    where = {"auto": "auto (a CUDA GPU when the node has one, else the CPU)"}.get(c["device"], c["device"])
    procs = (f"{c['gpus']} processes per run (gpus = {c['gpus']}: torchrun locally, {c['gpus']} tasks on one node "
             "under Slurm), batch_size split evenly" if c["gpus"] > 1 else "1 process per run (gpus = 1)")
    precision = {"auto": "bf16 autocast on CUDA, fp32 on a CPU"}.get(c["precision"], c["precision"])
    on = lambda flag: "on" if flag else "off"  # noqa: E731
    layout = "by network (auto)" if c["channels_last"] == "auto" else on(c["channels_last"])
    return (f"device: {where}; {procs}; precision: {precision}; TF32 {on(c['tf32'])} and fused AdamW "
            f"{on(c['fused_adamw'])} (CUDA only); channels_last {layout}; torch.compile "
            f"{on(c['compile'])} (bench/core/runtime.py; `train --device/--precision/--compile`)")


def train_basis(suite: Suite, run: RunSpec) -> str:
    """Where a run's training throughput comes from, with the figures that give it."""
    cfg, arch = run.config, run.config["arch"]
    res, precision, gpus = run_resolution(cfg), train_precision(cfg), int(cfg.get("gpus", 1))
    ips, rates = train_throughput(suite, run), _peaks(suite.cost)
    gflop = forward_gflop(arch, res) if res else None
    head = f"{arch} at {res} px" + (f", {precision}" if rates else "")
    per_gpu = f"{ips / gpus:,.1f} images/s per GPU x {gpus} GPUs" if gpus > 1 else f"{ips:,.1f} images/s"
    if _measured(suite.cost, "train", arch, precision, res):
        return f"{head}: {per_gpu} (measured)"
    if not (rates and gflop):
        return f"{head}: {ips:,.1f} images/s" + (" (the suite's [cost])" if stated_throughput(suite.cost, arch) else "")
    peak = peak_tflops(rates, precision)
    tflops = ips / gpus * TRAIN_FLOP_FACTOR * gflop / 1e3
    if stated_throughput(suite.cost, arch):
        return f"{head}: {per_gpu} (the suite's [cost]) = {tflops:.0f} TFLOP/s per GPU, {100 * tflops / peak:.0f}% of peak"
    use = float(suite.cost.get("utilization", DEFAULT_UTILIZATION))
    return (f"{head}: {TRAIN_FLOP_FACTOR:g} x {gflop:.1f} GFLOP per image at {peak:g} TFLOP/s x {use:g} "
            f"utilization = {per_gpu}")


def describe_plan(suite: Suite, states: dict[str, str] | None = None, jobs: int = 1) -> str:
    """The dry-run text: every run with its state and estimated cost, then the totals."""
    states = states or {}
    est = estimate_cost(suite)
    lines = [f"suite {suite.name} ({suite.file}): {len(est.runs)} runs = "
             f"{len(suite.methods)} methods x {len(suite.workloads)} workloads x {len(suite.seeds)} seeds",
             f"budget per run: {suite.iters} iterations x batch {suite.batch_size} = "
             f"{suite.iters * suite.batch_size:,} images; evaluation every {suite.eval_every} iterations "
             f"and at the end: {', '.join(suite.eval['metrics'])} on {suite.eval.get('num_images', '?')} images, "
             f"sampler {suite.eval.get('sampler', 'default')} {suite.eval.get('sampler_steps', '')} steps",
             ""]
    width = max(len(r.key) for r, _ in est.runs)
    lines.append(f"{'run':<{width}}  {'state':<8} {'train img':>12} {'sample img':>11} {'train':>10} {'eval':>10} "
                 f"{'est. time':>10}")
    todo_s = est.setup_s if not any(v == "done" for v in states.values()) else 0.0
    for r, c in est.runs:
        state = states.get(r.key, "todo")
        if state != "done":
            todo_s += c.total_s
        lines.append(f"{r.key:<{width}}  {state:<8} {c.train_images:>12,} {c.sample_images:>11,} "
                     f"{format_duration(c.train_s):>10} {format_duration(c.eval_s):>10} "
                     f"{format_duration(c.total_s):>10}")
    measured = suite.cost.get("measured")
    device = (f"{measured['device']} (measured by the GPU check: {measured['file']})" if measured
              else suite.cost.get("device", "the project's 2-core CPU"))
    train_s = sum(c.train_s for _, c in est.runs)
    eval_s = sum(c.eval_s for _, c in est.runs)
    gpu_priced = bool(_peaks(suite.cost))
    lines += ["", runtime_summary(suite.train), "training throughput: " + "; ".join(
        dict.fromkeys(train_basis(suite, r) for r, _ in est.runs))]
    if suite.slurm:
        try:
            p = slurm_parameters(suite.slurm, suite.name, "slurm", int(suite.train.get("gpus", 1)))
            lines.append("Slurm job per run (--executor slurm): " + ", ".join(f"{k}={v}" for k, v in p.items()
                                                                             if v not in ("", None)))
        except ConfigError as exc:
            lines.append(f"Slurm job per run (--executor slurm): cannot be submitted: {exc}")
    lines += ["",
              f"images to train: {est.train_images:,}; images to sample: {est.sample_images:,} "
              f"({est.network_evals:,} network evaluations)",
              f"estimated time on {device}: {format_duration(est.total_s)} ({est.total_s:,.0f} s) for all runs "
              f"(training {format_duration(train_s)}, evaluation {format_duration(eval_s)}"
              f" = {100 * eval_s / max(train_s, 1e-9):.0f}% of training"
              + (f", one-time evaluator setup {format_duration(est.setup_s)}" if est.setup_s else "")
              + f"); still to run: {format_duration(todo_s)}"
              + (f", about {format_duration(todo_s / jobs)} with {jobs} parallel jobs" if jobs > 1 else ""),
              ("model: iters x batch / training images/s (measured, stated, or 3 x forward GFLOP at the peak of the "
               "training precision x utilization x GPUs); evaluation from FLOPs (or measured rates): sampled images x "
               "sampler steps x forward GFLOP at the peak of the sample precision x utilization x GPUs, + Inception "
               "and resize per generated image; + startup_s + eval points x eval_overhead_s, + setup_s once "
               "(bench/suite/cost.py)"
               if gpu_priced else
               "model: iters x batch / train_images_per_s + sampled images x sampler steps / "
               "(train_images_per_s x forward_ratio) + startup_s + eval points x eval_overhead_s, + setup_s once "
               "(see bench/suite/cost.py)")]
    return "\n".join(lines)
