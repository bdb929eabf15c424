"""The dry run's cost model (:func:`estimate_cost`, :func:`describe_plan`), deliberately simple:

- training: ``iters * batch_size`` images at ``train_images_per_s`` (one optimizer step per
  image, forward + backward + EMA), from the suite's [cost] table or the built-in table
  :data:`TRAIN_IMAGES_PER_S` (measured on the project's 2-core CPU), scaled by
  ``(reference resolution / resolution)^2`` for other resolutions;
- sampling: every evaluation generates ``num_images`` images with ``sampler_steps`` network
  evaluations each; one network evaluation without backward costs ``1 / forward_ratio`` of a
  training image (default 2.5, measured for unet-tiny on the CPU; 3 is the textbook figure);
- on GPUs (a [cost] table with ``device_tflops``): evaluation is priced from FLOPs instead:
  sampled images x sampler steps x the network's forward FLOPs (:data:`FORWARD_GFLOP`, counted
  with torch.utils.flop_counter, scaled by the pixel count) at the peak rate of the sampling
  precision (eval ``sample_precision``, default tf32) x ``utilization`` (default 0.35) x the run's
  GPUs (evaluation is sharded over them), plus Inception's forward (:data:`INCEPTION_GFLOP`, in
  fp32) and clean-fid's resize on the CPUs (``resize_images_per_s`` for the whole node) for every
  generated image of an FID / KID metric;
- fixed costs: ``startup_s`` per run (process start, data loading), ``eval_overhead_s`` per
  evaluation (feature extraction of the generated images on a CPU, metric arithmetic), and ``setup_s``
  once per suite (the evaluator's first-time setup: reference statistics, or training a proxy
  feature extractor that is not shipped; cached under $DIFFBENCH_CACHE/eval, by default
  ~/.cache/diffbench/eval, afterwards, so counted only
  while no run of the suite has finished).
Evaluations happen every ``eval.every`` iterations and at the end (as bench.train.loop does).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.eval_steps import eval_steps, evaluates, noise_sets_at
from bench.errors import ConfigError
from bench.eval.spec import DEFAULTS
from bench.suite.grid import RunSpec, Suite
from bench.suite.slurm import slurm_parameters

#: training throughput (images/s) by architecture at a reference resolution, on the project's
#: 2-core CPU (unet-tiny measured with batch 32, forward + backward + Adam step; ddpm-unet
#: extrapolated from its FLOPs). A suite's [cost] table overrides these.
TRAIN_IMAGES_PER_S = {
    "unet-tiny": (16, 450.0),
    "ddpm-unet": (32, 6.0),
}

DEFAULT_FORWARD_RATIO = 2.5

#: forward FLOPs of one image (GFLOP, multiply-add = 2) at a reference resolution, counted with
#: torch.utils.flop_counter.FlopCounterMode on the meta device (tests/test_suite.py recounts
#: adm-unet); other resolutions scale with the pixel count.
FORWARD_GFLOP = {
    "unet-micro": (12, 0.017),
    "unet-tiny": (16, 0.122),
    "ddpm-unet": (32, 12.44),
    "adm-unet": (128, 613.6),
}

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


def forward_gflop(arch: str, resolution: int) -> float | None:
    """One image's forward FLOPs through `arch` at `resolution` (GFLOP), None for an architecture
    the table lacks."""
    if arch not in FORWARD_GFLOP:
        return None
    ref, gflop = FORWARD_GFLOP[arch]
    return gflop * (resolution / ref) ** 2


def train_throughput(suite: Suite, run: RunSpec) -> float:
    """Training images per second assumed for a run (see the module docstring)."""
    arch = run.config["arch"]
    if arch in suite.cost.get("arch_images_per_s", {}):
        return float(suite.cost["arch_images_per_s"][arch])
    if "train_images_per_s" in suite.cost:
        return float(suite.cost["train_images_per_s"])
    ref_res, ips = TRAIN_IMAGES_PER_S.get(arch, (16, 100.0))
    res = run.config.get("resolution") or _native_resolution(run.config["dataset"]) or ref_res
    return ips * (ref_res / res) ** 2


def _native_resolution(dataset: str) -> int | None:
    try:
        # torch on first use: a dry run needs no torch
        from bench.data.loading import dataset_info

        return dataset_info(dataset).RESOLUTION
    except Exception:
        return None


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
    res = cfg.get("resolution") or _native_resolution(cfg["dataset"])
    gflop = forward_gflop(cfg["arch"], res) if res else None
    if "device_tflops" in suite.cost and gflop is not None:
        sample_s, feature_s = _gpu_eval_seconds(suite.cost, ev, nfe, n_img, gflop, int(cfg.get("gpus", 1)))
    return RunCost(train_images, points, n_img, nfe, train_images / ips, sample_s, overhead, feature_s, eval_overhead)


def _gpu_eval_seconds(cost: dict, ev: dict, nfe: int, n_img: int, gflop: float, gpus: int) -> tuple[float, float]:
    """(sampling, features) seconds of an evaluation plan on `gpus` GPUs, from FLOPs at the peak rates
    of [cost] device_tflops x utilization; features only for Inception metrics (the proxy's are free)."""
    rates, use = cost["device_tflops"], float(cost.get("utilization", DEFAULT_UTILIZATION))
    precision = ev.get("sample_precision") or "tf32"
    rate = lambda p: float(rates.get(p) or rates.get("fp32")) * 1e12 * use * gpus  # noqa: E731
    sample_s = nfe * gflop * 1e9 / rate(precision)
    feature_s = 0.0
    if {"fid", "kid"} & set(ev["metrics"]):
        feature_s = n_img * INCEPTION_GFLOP * 1e9 / rate("fp32") + n_img / float(
            cost.get("resize_images_per_s", DEFAULT_RESIZE_IMAGES_PER_S))
    return sample_s, feature_s


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
    return (f"device: {where}; {procs}; precision: {precision}; TF32 {on(c['tf32'])} and fused AdamW "
            f"{on(c['fused_adamw'])} (CUDA only); channels_last {on(c['channels_last'])}; torch.compile "
            f"{on(c['compile'])} (bench/core/runtime.py; `train --device/--precision/--compile`)")


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
    device = suite.cost.get("device", "the project's 2-core CPU")
    train_s = sum(c.train_s for _, c in est.runs)
    eval_s = sum(c.eval_s for _, c in est.runs)
    gpu_priced = "device_tflops" in suite.cost
    lines += ["", runtime_summary(suite.train)]
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
              ("model: iters x batch / train_images_per_s; evaluation from FLOPs: sampled images x sampler steps "
               "x forward GFLOP at device_tflops[sample precision] x utilization x GPUs, + Inception and resize per "
               "generated image; + startup_s + eval points x eval_overhead_s, + setup_s once (bench/suite/cost.py)"
               if gpu_priced else
               "model: iters x batch / train_images_per_s + sampled images x sampler steps / "
               "(train_images_per_s x forward_ratio) + startup_s + eval points x eval_overhead_s, + setup_s once "
               "(see bench/suite/cost.py)")]
    return "\n".join(lines)
