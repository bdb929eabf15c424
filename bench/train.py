"""The one training loop every method shares.

Reads top to bottom: build everything from a TrainConfig, resume from the run folder's
checkpoint if there is one, then per iteration: draw a batch, draw t from the method's
distribution, compute per-sample losses, weight them, reduce once, step the optimizer with
the method's learning-rate scale and betas, update the EMA, and log. Evaluation runs on the
EMA weights outside the training clock.

Run folder:
  config.json          this TrainConfig plus the method's label, slots and resolved params
  steps.jsonl          a row per iteration (loss, MSE per timestep quartile, lr, beta1, ...)
  evals.jsonl          a row per evaluation and metric (written by the evaluation hook)
  method_trace.json    what the method does at p = 0, 0.1, ..., 1 (for the report)
  checkpoint.pt        state_dicts of model, EMA, optimizer, every RNG state, step, clocks
  status.json          running | done | failed, with step and reason
"""

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import io
from bench.budget import evaluates, is_eval_step
from bench.data import dataset_info, load_dataset, to_model_range
from bench.describe import trace
from bench.diffusion import SCHEDULES, TARGETS, make_schedule
from bench.errors import CheckpointError, ConfigError, DivergenceError
from bench.models import build_model
from bench.perf import tune_allocator
from bench.registry import get_method
from bench.spec import ema_decay_at, loss_weights_at, optimizer_settings_at, timestep_probs_at

CHECKPOINT_FORMAT = 2  # 2: one generator per random stream (timesteps, noise, flips)


@dataclass
class TrainConfig:
    """Every setting of a training run. Saved as config.json beside the results."""

    # Method.
    method: str = "baseline"
    method_params: dict = field(default_factory=dict)
    plugins: list = field(default_factory=list)
    # Data.
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    resolution: int | None = None  # None: the dataset's own
    flip: bool = False
    # Network and diffusion.
    arch: str = "unet-tiny"
    schedule: str = "linear"
    T: int = 1000
    target: str = "eps"
    zero_terminal_snr: bool = False
    # Optimisation: the compute budget is iters x batch_size images.
    iters: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay_k = min(decay, (1 + k) / (10 + k)): early EMAs forget the initial weights
    seed: int = 0
    # Bookkeeping.
    ckpt_every: int = 500
    eval_every: int = 0  # 0: evaluate only at the end, and only when `eval` is set
    eval: dict = field(default_factory=dict)  # the Evaluator's spec (bench/evaluate.py)
    channels_last: bool = True
    threads: int = 0  # 0: torch's default

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
        defaults = cls()
        values = {}
        for key, value in d.items():
            want = type(getattr(defaults, key))
            if key in ("data_dir", "resolution") and value is None:
                values[key] = None
                continue
            if key == "resolution":
                want = int
            if key == "data_dir":
                want = str
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{where}: key {key!r} must be {want.__name__}, got {value!r}")
            values[key] = value
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        def bad(key, why):
            raise ConfigError(f"{where}: {key}={getattr(self, key)!r} {why}")

        if self.schedule not in SCHEDULES:
            bad("schedule", f"is not one of {', '.join(SCHEDULES)}")
        if self.target not in TARGETS:
            bad("target", f"is not one of {', '.join(TARGETS)}")
        for key in ("iters", "batch_size", "T", "ckpt_every"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        for key in ("warmup", "eval_every", "threads", "seed"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.T < 2:
            bad("T", "must be >= 2")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        for key in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                bad(key, "must be in [0, 1)")
        if self.resolution is not None and self.resolution < 4:
            bad("resolution", "must be >= 4")
        dataset_info(self.dataset)
        get_method(self.method, self.method_params, self.plugins)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_record(cfg: TrainConfig) -> dict:
    """config.json: the config plus what the method resolved to."""
    method = get_method(cfg.method, cfg.method_params, cfg.plugins)
    return {**cfg.to_dict(), "method_label": method.label, "method_slots": sorted(method.slots),
            "method_resolved_params": dict(method.hp), "method_source": method.source}


def evaluator_spec(cfg: TrainConfig) -> dict:
    """The evaluation spec of a run: its `eval` table, on the run's own data and resolution."""
    resolution = cfg.resolution or dataset_info(cfg.dataset).RESOLUTION
    return {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "resolution": resolution, **cfg.eval}


def _set_status(out: Path, state: str, step: int, clocks: dict, reason: str | None = None) -> None:
    io.write_json(out / "status.json", {"state": state, "step": step, "reason": reason, **clocks})


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to restart the run from scratch"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a diffbench checkpoint (format {CHECKPOINT_FORMAT}); delete it to restart")
    return ckpt


def batch_indices(step: int, batch_size: int, n: int, seed: int, cache: dict) -> torch.Tensor:
    """Indices of the images in iteration `step`: consecutive slices of per-epoch permutations.

    Each epoch's permutation comes from its own seed, so the order is a pure function of
    (seed, step): nothing to save for resume, and equal for every method with the same seed.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        if cache.get("epoch") != epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache.update(epoch=epoch, perm=torch.randperm(n, generator=g))
        take = min(batch_size - len(out), n - offset)
        out.extend(cache["perm"][offset: offset + take].tolist())
    return torch.tensor(out)


def stream_generators(seed: int) -> dict[str, torch.Generator]:
    """One generator per random stream, each seeded from the run's seed alone.

    Separate streams are what make seed k give every method the same noise and flips: the
    noise generator is never advanced by the timestep draw, whatever the method's distribution.
    """
    return {name: torch.Generator().manual_seed(seed * 1_000_003 + offset)
            for offset, name in ((101, "t"), (202, "noise"), (303, "flip"))}


def sample_timesteps(probs: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n timesteps from `probs` by inverse CDF of n uniforms from `gen`.

    Every method consumes exactly n uniforms per step and maps uniform u to the same quantile
    of its own distribution, so methods at one seed share their random numbers (common random
    numbers) and the draw does not depend on how torch.multinomial uses a generator.
    """
    cdf = torch.cumsum(probs.double(), 0)
    u = torch.rand(n, generator=gen, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(probs) - 1)


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


def train(cfg: TrainConfig, out_dir, events: TrainEvents | None = None) -> dict:
    """Train (or resume) the run in `out_dir`; return its final status. `events` hears of every
    step and evaluation (:class:`TrainEvents`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tune_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.validate()

    # Refuse to mix two configurations in one folder.
    record = run_record(cfg)
    if (out / "config.json").exists():
        old = io.read_json(out / "config.json")
        if json.loads(io.dumps(old)) != json.loads(io.dumps(record)):
            changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ConfigError(
                f"{out} holds a run with a different config (differs in: {', '.join(changed)}); "
                "use another output folder or delete that one"
            )
    else:
        io.write_json(out / "config.json", record)
    status_path = out / "status.json"
    if status_path.exists() and io.read_json(status_path).get("state") == "done":
        return io.read_json(status_path)

    # Method, schedule, data.
    method = get_method(cfg.method, cfg.method_params, cfg.plugins)
    schedule = make_schedule(cfg.schedule, cfg.T, cfg.zero_terminal_snr)
    images, _ = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.resolution)
    n, channels, resolution = images.shape[0], images.shape[1], images.shape[-1]
    io.write_json(out / "method_trace.json",
                  trace(method, schedule, cfg.target, cfg.beta1, cfg.beta2, cfg.ema_decay))

    # Model, EMA, optimizer. The seed fixes the initial weights, the same for every method.
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.arch, channels, resolution).to(memory_format=memory_format)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, foreach=True)
    gens = stream_generators(cfg.seed)
    step, clocks = 0, {"train_seconds": 0.0, "eval_seconds": 0.0}

    # Resume.
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this run ({str(exc)[:120]}); delete it to restart") from None
        torch.set_rng_state(ckpt["rng_torch"])
        for name, g in gens.items():
            g.set_state(ckpt["rng"][name])
        step, clocks = int(ckpt["step"]), dict(ckpt["clocks"])
    # Anything logged after the checkpoint will be redone: drop it, so nothing is repeated.
    io.trim_jsonl(out / "steps.jsonl", step)
    io.trim_jsonl(out / "evals.jsonl", step)
    _set_status(out, "running", step, clocks)

    evaluator = None
    if evaluates(cfg.eval, cfg.eval_every):
        from bench.evaluate import Evaluator

        evaluator = Evaluator(evaluator_spec(cfg))

    def save_checkpoint():
        state = {"format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                 "opt": opt.state_dict(), "rng_torch": torch.get_rng_state(),
                 "rng": {name: g.get_state() for name, g in gens.items()},
                 "clocks": clocks}
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    T, B = cfg.T, cfg.batch_size
    perm_cache, pending = {}, []
    model.train()
    while step < cfg.iters:
        t_start = time.perf_counter()
        p = step / cfg.iters

        # Draw the batch: images, optional flips, timesteps from the method, noise.
        x0 = to_model_range(images[batch_indices(step, B, n, cfg.seed, perm_cache)])
        if cfg.flip:
            flip = torch.rand(B, generator=gens["flip"]) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = sample_timesteps(timestep_probs_at(method, p, schedule), B, gens["t"])
        eps = torch.randn(x0.shape, generator=gens["noise"])
        x_t = schedule.q_sample(x0, t, eps).contiguous(memory_format=memory_format)

        # Per-sample losses, weighted by the method, reduced in exactly one place.
        pred = model(x_t, t)
        mse = (pred - schedule.target(cfg.target, x0, eps, t)).square().mean(dim=(1, 2, 3))
        weights = loss_weights_at(method, t, p, schedule, cfg.target).to(mse.dtype)
        loss = (weights * mse).mean()

        # Backward, clip, and step with the method's optimizer settings.
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr_scale, beta1, beta2 = optimizer_settings_at(method, p, cfg.beta1, cfg.beta2)
        lr = cfg.lr * lr_scale * (min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0)
        grad_norm = grad_norm.item()
        clipped = cfg.grad_clip > 0 and grad_norm > cfg.grad_clip
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr, (beta1, beta2)
        opt.step()

        # Update EMA.
        decay = ema_decay_at(method, p, cfg.ema_decay)
        if cfg.ema_warmup:
            decay = min(decay, ema_warmup_decay(step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - decay)
        step += 1

        # Log: the objective, the unweighted MSE per timestep quartile, the optimizer's state.
        loss_value = loss.item()
        quart = (t * 4 // T)
        q_sum = torch.zeros(4).index_add_(0, quart, mse.detach())
        q_cnt = torch.bincount(quart, minlength=4)
        elapsed = time.perf_counter() - t_start
        clocks["train_seconds"] += elapsed
        row = {"step": step, "p": p, "loss": loss_value, "mse": mse.mean().item(),
               **{f"loss_q{i}": (q_sum[i] / q_cnt[i]).item() if q_cnt[i] else None for i in range(4)},
               "lr": lr, "lr_scale": lr_scale, "beta1": beta1, "grad_norm": grad_norm, "clipped": clipped,
               "ema_decay": decay,
               "images_per_s": B / elapsed, "train_seconds": clocks["train_seconds"]}
        pending.append(row)
        if events:
            events.on_step(step, cfg.iters, row)
        if not math.isfinite(loss_value):
            io.append_jsonl(out / "steps.jsonl", pending)
            _set_status(out, "failed", step, clocks, f"non-finite loss ({loss_value}) at step {step}")
            raise DivergenceError(step, f"training diverged: loss {loss_value} at step {step}; lower lr or check the method's hyperparameters")

        # Evaluate the EMA weights (outside the training clock), then checkpoint.
        final = step == cfg.iters
        eval_due = evaluator is not None and is_eval_step(step, cfg.iters, cfg.eval_every)
        eval_rows = []
        if eval_due:
            e_start = time.perf_counter()
            ema.eval()
            eval_rows = evaluator.evaluate(ema, schedule, cfg.target, step)
            clocks["eval_seconds"] += time.perf_counter() - e_start
            if events:
                events.on_eval(step, eval_rows)
        if eval_due or final or step % cfg.ckpt_every == 0:
            io.append_jsonl(out / "steps.jsonl", pending)
            io.append_jsonl(out / "evals.jsonl", eval_rows)
            pending = []
            save_checkpoint()
            _set_status(out, "running", step, clocks)

    _set_status(out, "done", step, clocks)
    return io.read_json(status_path)
