"""The one training loop every method shares.

Reads top to bottom: build everything from a TrainConfig, resume from the run folder's
checkpoint if there is one, then per iteration: draw a batch, draw t from the method's
distribution, compute per-sample losses, weight them, reduce once, step the optimizer with
the method's learning-rate scale and betas, update the EMA, and log. Evaluation runs on the
EMA weights outside the training clock.

Device and processes (bench/core/runtime.py): everything lives on the run's device; the random
draws are keyed by (seed, stream, step, image) on the CPU (bench/train/batches.py), so a seed
gives the same data, timesteps and noise on any device and any number of processes. With N
processes (torchrun, DDP) every process draws its own slice of the global batch, gradients are
averaged, and rank 0 alone keeps the EMA and writes files; every process evaluates its share of
the images (rank 0's EMA, broadcast first). The device's numbers are read once per sync interval.

Run folder:
  config.json          this TrainConfig plus the method's label, slots and resolved params, and
                       `runtime`: the device and fast path of each stretch of the run
  steps.jsonl          a row per iteration (loss, MSE per timestep quartile, lr, beta1, ...)
  evals.jsonl          a row per evaluation and metric (written by the evaluation hook)
  method_trace.json    what the method does at p = 0, 0.1, ..., 1 (for the report); "aux": how an aux_loss
                       method's module was built (REPA: its teacher's name and weights' SHA-256)
  checkpoint.pt        state_dicts of model, EMA, optimizer, every RNG state, step, clocks (and the
                       previous one, checkpoint.prev.pt; their SHA-256 in checkpoint*.sha256)
  status.json          running | done | failed, with step and reason
"""

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import fileio
from bench.core.config import TrainConfig
from bench.core.describe import trace
from bench.core.diffusion import make_schedule
from bench.core.eval_steps import is_eval_step, noise_sets_at
from bench.core.perf import tune_allocator
from bench.core.runtime import (
    Runtime,
    StopRequested,
    barrier,
    broadcast_module,
    gather_slices,
    make_runtime,
    stepping,
    stop_requested,
)
from bench.core.spec import (
    Method,
    assign_noise_at,
    ema_decay_at,
    ema_snapshot_at,
    observe_at,
    optimizer_settings_at,
    stream_seed_at,
    track_ema_at,
    uses_ema_warmup,
)
from bench.data.loading import is_memory_mapped, load_dataset, to_model_range
from bench.errors import BenchError, ConfigError, DivergenceError
from bench.eval.evaluate import Evaluator, check_eval_data
from bench.eval.reference import TRAIN_COMPUTE_LIMIT, evaluators_of
from bench.models.networks import build_model
from bench.train.batches import stop_drawing, take_batch
from bench.train.checkpoint import resume_latest, save_checkpoint
from bench.train.extras import build_aux, write_ema_snapshot
from bench.train.live_log import close_live_log, live_log
from bench.train.resolve import ResolvedRun, resolve_run
from bench.train.run_folder import open_run_folder, record_runtime, trim_logs, write_status
from bench.train.state import RunState, Streams

# Steps between host syncs: each one drains a GPU's queue; a CPU has none, so it reads every step at once.
SYNC_EVERY_GPU, SYNC_EVERY_CPU = 25, 1


def _set_status(out: Path, state: str, step: int, clocks: dict, reason: str | None = None) -> None:
    write_status(out, state, step, reason, **clocks)


def ema_warmup_decay(step: int) -> float:
    """(1 + k) / (10 + k) at step k (0-based). The EMA's window grows with the run (about k / 9 steps),
    so the random initialisation's share of it, the product of these decays, is about 1e-5 after
    10 steps; a fixed decay d keeps d^k of it (0.99: 40% after 90 steps)."""
    return (1.0 + step) / (10.0 + step)


class TrainEvents:
    """What train() reports while it runs (for a terminal display); override what you need."""

    def on_step(self, step: int, iters: int, row: dict) -> None:
        """After every iteration, with its steps.jsonl row."""

    def on_eval(self, step: int, rows: list[dict]) -> None:
        """After every evaluation, with its evals.jsonl rows."""


def setup(cfg: TrainConfig, method: Method, rt: Runtime | None = None) -> RunState:
    """Schedule, data, model, EMA, optimizer and generators of a fresh run (step 0), on rt's device
    (default: resolved from cfg here)."""
    rt = rt or make_runtime(cfg)
    device = rt.torch_device
    schedule = make_schedule(cfg.schedule, cfg.T, cfg.zero_terminal_snr)
    images, labels = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.resolution)
    num_classes = class_count(cfg, labels) if cfg.class_cond else 0
    # The seed fixes the initial weights, the same for every method (and every process).
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    conditioning = {"num_classes": num_classes} if num_classes else {}
    model = build_model(cfg.arch, images.shape[1], images.shape[-1], **conditioning).to(device,
                                                                                          memory_format=memory_format)
    if rt.rank > 0:  # dropout: each process its own masks (rank 0 keeps the one-process stream)
        torch.manual_seed(cfg.seed * 1_000_003 + 404 + rt.rank)
    ema = copy.deepcopy(model).requires_grad_(False)
    # An aux_loss method's extra module (its own seed) trains beside the network, not in the EMA.
    aux = build_aux(method, model, tuple(images.shape[1:]), cfg.dataset, cfg.data_dir, cfg.seed)
    if aux is not None:
        aux.module.to(device)
    extra = [] if aux is None else [q for q in aux.module.parameters() if q.requires_grad]
    kernel = {"fused": True} if rt.fused_adamw else {"foreach": True}
    opt = torch.optim.AdamW(list(model.parameters()) + extra, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, **kernel)
    # A memory-mapped set stays on the CPU (each batch is read from it); a small one moves whole.
    resident = images if is_memory_mapped(images) else images.to(device)
    return RunState(cfg, method, rt, schedule, resident, labels.to(resident.device) if num_classes else None,
                    num_classes, model, ema, opt,
                    Streams(cfg.seed, stream_seed_at(method, cfg.seed)), memory_format, aux=aux)


def check_data_and_network(cfg: TrainConfig) -> None:
    """Load the training set (cached: setup reuses it), check its labels for a class-conditional run,
    and build the network on the meta device (nothing allocated): an unknown architecture or a
    resolution it cannot take fails here, before the run folder is written."""
    images, labels = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.resolution)
    classes = class_count(cfg, labels) if cfg.class_cond else 0
    with torch.device("meta"):
        build_model(cfg.arch, images.shape[1], images.shape[-1], **({"num_classes": classes} if classes else {}))


def class_count(cfg: TrainConfig, labels: torch.Tensor) -> int:
    """K of a class-conditional run: the dataset's labels 0..K-1; one ConfigError line when it has none."""
    if len(labels) == 0 or int(labels.min()) < 0:
        raise ConfigError(f"class_cond: dataset {cfg.dataset!r} has no class labels; prepare it with class "
                          "subfolders, or set class_cond = false")
    return int(labels.max()) + 1


@dataclass
class PendingRow:
    """A step's steps.jsonl row before its numbers leave the device: `row` holds what the host knows,
    `stats` the device's numbers ([loss, mse, q0..q3 sums, q0..q3 counts, grad norm?]); settle()
    reads every pending row's stats with one host sync."""

    row: dict
    stats: torch.Tensor


def step(state: RunState) -> PendingRow:
    """One iteration, launched without waiting for the device; its row is read by settle()."""
    cfg, method, rt, schedule = state.cfg, state.method, state.rt, state.dev_schedule
    k, B, p = state.step, cfg.batch_size, state.step / cfg.iters

    # Draw the batch: images, optional flips, timesteps from the method, noise (this process's slice);
    # data_seconds is the wall time this step waited for it (on a GPU, drawn ahead in a thread).
    batch, data_seconds = take_batch(state, k)
    b = B // rt.world_size
    mine = slice(rt.rank * b, (rt.rank + 1) * b)
    x0 = to_model_range(batch.images)
    if batch.flip is not None:
        x0 = torch.where(batch.flip[:, None, None, None], x0.flip(-1), x0)
    t, eps = batch.t_global[mine], assign_noise_at(method, x0, batch.eps)  # a noise method may reassign it
    x_t = schedule.q_sample(x0, t, eps).contiguous(memory_format=state.memory_format)

    # Per-sample losses, weighted by the method, reduced in exactly one place (the network may run
    # in bf16; its output, the loss and the weights are fp32).
    # An aux_loss method adds its own per-sample loss (already scaled by its weight).
    with rt.autocast():
        if state.aux is not None:
            pred, extra = state.net(x_t, t, batch.labels, x0)
        else:
            pred, extra = state.net(x_t, t) if batch.labels is None else state.net(x_t, t, batch.labels), None
    mse = (pred.float() - schedule.target(cfg.target, x0, eps, t)).square().mean(dim=(1, 2, 3))
    per_sample = batch.weights_global[mine] * mse
    if extra is not None:
        per_sample = per_sample + extra.float()
    loss = per_sample.mean()

    # Backward (DDP averages the gradients over processes), clip, and step with the method's
    # optimizer settings.
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    # Without clipping, no norm: it would be one more pass over every gradient each step (logged as None).
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
    lr_scale, beta1, beta2 = optimizer_settings_at(method, p, cfg.beta1, cfg.beta2)
    lr = cfg.lr * lr_scale * (min(1.0, (k + 1) / cfg.warmup) if cfg.warmup else 1.0)
    for group in state.opt.param_groups:
        group["lr"], group["betas"] = lr, (beta1, beta2)
    state.opt.step()

    # Feed the global batch's t and unweighted losses back to a feedback method (a host sync; every
    # process gets every process's losses, so their states stay equal).
    mse_all = gather_slices(mse.detach())
    if "feedback" in method.slots:
        observe_at(method, batch.t_global.cpu(), mse_all.double().cpu())

    # Update EMA (rank 0 keeps it, and an ema method's own averages).
    decay = ema_decay_at(method, p, cfg.ema_decay, k + 1)
    if cfg.ema_warmup and uses_ema_warmup(method):
        decay = min(decay, ema_warmup_decay(k))
    if rt.rank == 0:
        with torch.no_grad():
            torch._foreach_lerp_(list(state.ema.parameters()), state.params, 1.0 - decay)
        track_ema_at(method, k + 1, state.model)
    state.step += 1

    # Log: the objective, the unweighted MSE per timestep quartile (global batch), the optimizer's state;
    # kept on the device (no host sync: bincount and .item() would wait for the step).
    if rt.world_size == 1:
        logged_loss = loss.detach()
    else:  # the global batch's objective (with an aux method's extra loss, each process's share gathered)
        logged_loss = (batch.weights_global * mse_all).mean() if extra is None else gather_slices(per_sample.detach()).mean()
    quart = batch.t_global * 4 // cfg.T
    q_sum = torch.zeros(4, device=mse_all.device).index_add_(0, quart, mse_all)
    q_cnt = torch.zeros(4, device=mse_all.device).index_add_(0, quart, torch.ones_like(mse_all))
    norm = [] if grad_norm is None else [grad_norm.float().reshape(1)]
    stats = torch.cat([torch.stack([logged_loss, mse_all.mean()]), q_sum, q_cnt, *norm])
    row = {"step": state.step, "p": p, "lr": lr, "lr_scale": lr_scale, "beta1": beta1, "ema_decay": decay,
           "data_seconds": data_seconds}
    return PendingRow(row, stats)


def settle(state: RunState, pending: list[PendingRow], since: float) -> list[dict]:
    """The steps.jsonl rows of `pending`, read from the device with one host sync. `since` is when the
    first of them was launched (perf_counter): the interval's wall time, device work included, is
    the train clock's, shared evenly among its steps (images_per_s is the interval's rate)."""
    if not pending:
        return []
    cfg = state.cfg
    values = torch.stack([torch.nn.functional.pad(p.stats, (0, 11 - len(p.stats)), value=float("nan"))
                          for p in pending]).tolist()  # the one sync
    per_step = (time.perf_counter() - since) / len(pending)
    start_clock = state.clocks["train_seconds"]
    rows = []
    for k, (p, v) in enumerate(zip(pending, values)):
        loss, mse, q_sum, q_cnt = v[0], v[1], v[2:6], v[6:10]
        grad_norm = v[10] if len(p.stats) == 11 else None  # None: no clipping, no norm computed
        rows.append({"step": p.row["step"], "p": p.row["p"], "loss": loss, "mse": mse,
                     **{f"loss_q{i}": q_sum[i] / q_cnt[i] if q_cnt[i] else None for i in range(4)},
                     "lr": p.row["lr"], "lr_scale": p.row["lr_scale"], "beta1": p.row["beta1"], "grad_norm": grad_norm,
                     "clipped": grad_norm is not None and grad_norm > cfg.grad_clip, "ema_decay": p.row["ema_decay"],
                     "images_per_s": cfg.batch_size / per_step, "data_seconds": p.row["data_seconds"],
                     "train_seconds": start_clock + per_step * (k + 1)})
    state.clocks["train_seconds"] = start_clock + per_step * len(pending)
    return rows


def train_step(state: RunState) -> dict:
    """One iteration, waited for; returns its steps.jsonl row (loss, MSE per timestep quartile,
    optimizer state). The loop itself launches steps and reads their rows once per sync interval."""
    since = time.perf_counter()
    return settle(state, [step(state)], since)[0]


def _prepared_in_turn(evaluator: Evaluator, rt: Runtime) -> Evaluator:
    """Prepare `evaluator` (feature extractors, reference statistics, noise floor); with several
    processes rank 0 first (it fills the caches), then the others read them."""
    if rt.rank == 0:
        evaluator.prepare(rt.torch_device)
    barrier()
    if rt.rank > 0:
        evaluator.prepare(rt.torch_device)
    return evaluator


def _evaluate(state: RunState, evaluator, events: TrainEvents | None, out: Path) -> list[dict]:
    """Evaluate the EMA weights, outside the training clock: every process samples and scores its
    share of the images (rank 0's EMA, broadcast first), features are gathered to every rank, and
    rank 0's rows are the ones written.
    At the workload's budget, and at every evaluation of an extended baseline (the headline reads
    its whole curve), the metric is averaged over the spec's `noise_sets`; at the budget also the
    second sampler (`sampler2`) and the larger final set (`final_num_images`) are evaluated."""
    e_start = time.perf_counter()
    rows = []
    stepping(False)  # a Slurm signal now requeues at once: an evaluation can outlast its warning
    if evaluator is not None:
        cfg, spec = state.cfg, evaluator.spec
        at_budget = state.step == cfg.budget
        sets = noise_sets_at(state.step, cfg.iters, cfg.budget, spec["noise_sets"])
        state.ema.eval()
        broadcast_module(state.ema)  # rank 0 alone keeps the EMA
        # The evaluator sets its own precision: sampling as its spec says (every row names it), features in fp32.
        rows = evaluator.evaluate(state.ema, state.schedule, cfg.target, state.step, out_dir=out, noise_sets=sets)
        if at_budget:
            rows += _budget_evaluations(state, evaluator, out)
    barrier()
    stepping(True)
    state.clocks["eval_seconds"] += time.perf_counter() - e_start
    if events and evaluator is not None and state.rt.rank == 0:
        events.on_eval(state.step, rows)
    return rows


def _budget_evaluations(state: RunState, evaluator, out: Path) -> list[dict]:
    """The extra evaluations at the budget: `final_num_images` (e.g. FID-50k beside the FID-10k
    curve, as "<metric>_final") and the second sampler (as "<metric>_sampler2")."""
    spec, rows = evaluator.spec, []
    extra = ([("_final", {"num_images": spec["final_num_images"]})] if spec["final_num_images"] else []) + \
        ([("_sampler2", dict(spec["sampler2"]))] if spec["sampler2"] else [])
    for suffix, change in extra:  # the suffix names the metric and the saved samples alike
        other = evaluator.variant(**change, final_num_images=None, sampler2=None, noise_sets=1)
        if not other.is_prepared:  # another N: its own reference statistics, rank 0 first
            _prepared_in_turn(other, state.rt)
        rows += [{**r, "metric": f"{r['metric']}{suffix}"}
                 for r in other.evaluate(state.ema, state.schedule, state.cfg.target, state.step, out_dir=out,
                                         samples_suffix=suffix)]
    return rows


def _read_rows(state: RunState, launched: list[PendingRow], since: float, events: TrainEvents | None, out: Path,
               unwritten: list[dict]) -> list[dict]:
    """The launched steps' rows, each shown to `events`. A non-finite loss ends the run as failed at its
    step (every process sees the same loss), with the rows up to it written after `unwritten`."""
    rows = []
    for row in settle(state, launched, since):
        rows.append(row)
        if events:
            events.on_step(row["step"], state.cfg.iters, row)
        bad = [f"{k} ({row[k]})" for k in ("loss", "grad_norm") if row.get(k) is not None and not math.isfinite(row[k])]
        if bad:  # a non-finite gradient norm too: the clipped step would be zero, Adam would never move
            if state.rt.rank == 0:
                fileio.append_jsonl(out / "steps.jsonl", unwritten + rows)
                write_status(out, "failed", row["step"], f"non-finite {bad[0]} at step {row['step']}",
                             error="divergence", **state.clocks)
            raise DivergenceError(row["step"], f"training diverged: non-finite {bad[0]} at step {row['step']}; "
                                               "lower lr or check the method's hyperparameters")
    return rows


def train(run: ResolvedRun | TrainConfig, out_dir, events: TrainEvents | None = None) -> dict:
    """Train (or resume) the run in `out_dir`; return its final status. `events` hears of every
    step and evaluation (:class:`TrainEvents`). A bare TrainConfig is resolved first. With gpus > 1
    every torchrun process calls it; rank 0 writes the files."""
    run = run if isinstance(run, ResolvedRun) else resolve_run(run)
    cfg, method = run.config, copy.deepcopy(run.method)  # a method that learns (feedback) learns for this run only
    rt = make_runtime(cfg)  # before anything is written: a device or process count this machine lacks
    main = rt.rank == 0
    check_data_and_network(cfg)  # data that cannot be read, a network that does not fit it
    if run.eval_spec is not None:
        check_eval_data(run.eval_spec, cache=main)  # a split the evaluation needs and the dataset lacks
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tune_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fresh = not (out / "config.json").exists()
    done = open_run_folder(cfg, out, run.record, rt)
    if done:
        return done

    # Build the run, or resume it; anything logged after the checkpoint will be redone: drop it. A new
    # folder that cannot be built (e.g. a method's bad layer name) is left as it was found.
    try:
        state = setup(cfg, method, rt)
    except BenchError:
        if fresh and main:
            (out / "config.json").unlink(missing_ok=True)
        raise
    resume_latest(state, out)  # the newest good one of the last two (a bad one is named and set aside)
    if main:
        cold = trace(copy.deepcopy(run.method), state.schedule, cfg.target, cfg.beta1, cfg.beta2,  # cold start
                     cfg.ema_decay, iters=cfg.iters)
        built = {"aux": state.aux.record} if state.aux is not None and state.aux.record else {}  # e.g. REPA's teacher
        fileio.write_json(out / "method_trace.json", {**cold, **built})
        trim_logs(out, state.step)  # rows past the checkpoint are redone; a hole before it refuses the run
        record_runtime(out, rt, state.step)
        _set_status(out, "running", state.step, state.clocks)
        events = live_log(out, run.record, events, state.step)  # TensorBoard or W&B when asked (--log)
    evaluator = None
    if run.eval_spec is not None:  # every rank samples and scores its share of each evaluation
        # Every evaluation's references now (the budget's larger N too): one not cached and too large
        # for a training job fails here, not after the training it would end.
        evaluator, *_ = [_prepared_in_turn(ev, rt) for ev in
                         evaluators_of({**run.eval_spec, "num_classes": state.num_classes}, TRAIN_COMPUTE_LIMIT)]

    try:
        _run_steps(state, run, evaluator, events, out)
        if main:
            _set_status(out, "done", state.step, state.clocks)
    finally:  # done, diverged, stopped or failed: what was logged live is flushed and closed
        stop_drawing(state)
        if main:
            close_live_log(events)
    barrier()
    return fileio.read_json(out / "status.json")


def _run_steps(state: RunState, run: ResolvedRun, evaluator, events, out: Path) -> None:
    """The training steps from state.step to the end: evaluations, checkpoints, logs and status."""
    cfg, method, rt, main = state.cfg, state.method, state.rt, state.rt.rank == 0
    # Steps are launched without waiting for the device; their rows are read (one host sync), checked
    # and shown every `sync_every` steps, and before every evaluation and checkpoint.
    sync_every = SYNC_EVERY_CPU if rt.torch_device.type == "cpu" else SYNC_EVERY_GPU
    launched, rows, since = [], [], time.perf_counter()
    state.model.train()
    stepping(True)
    while state.step < cfg.iters:
        launched.append(step(state))
        fileio.fault_point("train_step")  # the reliability tests' kill inside training (nothing otherwise)
        snapshot = ema_snapshot_at(method, state.step) if main else None
        if snapshot is not None:  # e.g. a power EMA's tracked averages, for post-hoc reconstruction
            write_ema_snapshot(out, state.step, snapshot)
        eval_due = run.eval_spec is not None and is_eval_step(state.step, cfg.iters, cfg.eval_every, cfg.budget)
        ckpt_due = eval_due or state.step == cfg.iters or state.step % cfg.ckpt_every == 0
        if not (ckpt_due or state.step % sync_every == 0):
            continue

        # Read the launched steps' rows (a non-finite loss ends the run as failed at its step).
        rows += _read_rows(state, launched, since, events, out, rows)
        launched = []

        # Evaluate, then checkpoint (the logs are flushed with every checkpoint, never ahead of it).
        eval_rows = _evaluate(state, evaluator, events, out) if eval_due else []
        stop = stop_requested(rt.torch_device)  # a Slurm time limit or pre-emption: checkpoint now
        if stop or ckpt_due:
            if main:
                fileio.append_jsonl(out / "steps.jsonl", rows)
                fileio.append_jsonl(out / "evals.jsonl", eval_rows)
            save_checkpoint(state, out / "checkpoint.pt")
            if main:
                _set_status(out, "running", state.step, state.clocks,
                            reason=f"stopped by a signal at step {state.step}; resumes from here" if stop else None)
            rows = []
            if stop and state.step < cfg.iters:
                barrier()  # every process leaves after rank 0 has written the checkpoint and the status
                stepping(False)
                raise StopRequested(state.step)
        since = time.perf_counter()

    stepping(False)
