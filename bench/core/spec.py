"""The method plugin contract.

A method is a subclass of :class:`Method` in one small file under ``methods/`` (or any file
or folder passed with ``--plugins``). It declares:

- ``name``: the registry key, unique; what ``--method`` accepts.
- ``slots``: the parts of training it changes, a subset of ``SLOTS``, each filled by its hooks:
    * ``timesteps``: :meth:`~Method.timestep_probs` returns the distribution over t (the marginal of
      a batch); :meth:`~Method.sample_timesteps` maps the batch's uniforms to its t (default: each
      uniform by inverse CDF of that distribution; a method whose batch is not i.i.d. overrides it).
    * ``weighting``: :meth:`~Method.loss_weights` returns per-sample loss weights.
    * ``optimizer``: :meth:`~Method.optimizer` returns the learning-rate scale and Adam betas.
    * ``ema``: :meth:`~Method.ema_decay` returns the EMA decay (it may read the absolute step);
      :meth:`~Method.track_ema` sees the model after every update (extra averages of its own);
      :meth:`~Method.ema_snapshot` returns what to save in the run folder at a step, or None.
    * ``streams``: :meth:`~Method.stream_seed` returns the seed of the timestep and noise streams
      (the placebo's slot: the baseline on other random numbers, same initialisation and data).
    * ``noise``: :meth:`~Method.assign_noise` sees the process's batch of clean images and its drawn
      noise, and returns the noise to use (e.g. reassigned among the images).
    * ``feedback``: :meth:`~Method.observe` receives the global batch's t and unweighted per-sample
      losses after every step (every process gets every process's).
    * ``aux_loss``: :meth:`~Method.build_aux` returns the name of an inner module of the network and
      an extra trainable module (it joins the optimizer, the checkpoint and DDP);
      :meth:`~Method.aux_loss` returns a per-sample loss from that module, the inner module's output
      and the clean images, added to the weighted denoising loss.
  The harness calls only the hooks of declared slots; an undeclared slot keeps the baseline
  behaviour (uniform t, weight 1, base optimizer, base EMA decay, the drawn noise, no extra loss).
- ``params``: typed hyperparameters with defaults and allowed ranges (:class:`Param`).
  Instances are built with keyword overrides, validated, and read from ``self.hp``.
- ``source``: where the definition comes from, and which parts are our reconstruction.
- ``weight_scale``: "normalised" (default): the harness divides the weights by their mean under the
  method's own sampling at p (sum_t p(t) w(t)), so only the shape of p(t) w(t) is the method's and the
  gradient's scale stays the baseline's; "source": the weights as the source writes them (say why).
- ``ema_warmup``: whether the configured EMA warm-up caps this method's decay (a method that brings
  its own warm-up, e.g. a power-function EMA, sets False).

The harness calls a method only through the ``*_at`` functions below (the slot dispatch). A class
that overrides a hook without declaring its slot is refused when it is registered
(:func:`check_slots`), because the harness would silently never call that hook.

State: the hooks of timesteps, weighting, optimizer, streams and noise are pure functions of their
arguments (progress ``p`` in [0, 1] = iterations done / budget, the
:class:`~bench.core.diffusion.Schedule`, the step). A method that learns during training (feedback,
tracked averages) keeps its state in tensors returned by :meth:`~Method.state_dict`; the harness
saves them in every checkpoint and restores them with :meth:`~Method.load_state_dict`, so a killed
run resumes bit for bit. Each run trains its own copy of the method.
"""

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from bench.errors import ConfigError, HyperparameterError, MethodOutputError

SLOTS = ("timesteps", "weighting", "optimizer", "ema", "streams", "noise", "feedback", "aux_loss")
#: the hooks each slot fills
HOOKS = {"timesteps": ("timestep_probs", "sample_timesteps"), "weighting": ("loss_weights",),
         "optimizer": ("optimizer",), "ema": ("ema_decay", "track_ema", "ema_snapshot"), "streams": ("stream_seed",),
         "noise": ("assign_noise",), "feedback": ("observe",), "aux_loss": ("build_aux", "aux_loss")}
WEIGHT_SCALES = ("normalised", "source")


@dataclass(frozen=True)
class Param:
    """One typed hyperparameter. Bounds are inclusive unless `*_open` says otherwise."""

    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None

    @property
    def kind(self) -> type:
        return type(self.default)

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind in (str, bool):
            return f"any {self.kind.__name__}"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def parse(self, method: str, key: str, value: Any) -> Any:
        """Convert (from a string if needed) and check `value`; raise a one-line error."""
        kind, raw = self.kind, value

        def fail(why: str):
            raise HyperparameterError(
                f"method {method!r}: hyperparameter {key}={raw} {why}; allowed: {kind.__name__} "
                f"in {self.describe_range()} (default {self.default!r})"
            )

        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0"):
                        fail("is not a boolean")
                    value = value.lower() in ("true", "1")
                elif not isinstance(value, bool):
                    fail("is not a boolean")
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    fail("is not an integer")
                value = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    fail("is not a number")
                value = float(value)
            else:
                value = kind(value)
        except (TypeError, ValueError):
            fail(f"is not a valid {kind.__name__}")
        if self.choices is not None and value not in self.choices:
            fail("is not allowed")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:
                fail("is NaN")
            low = -math.inf if self.low is None else self.low  # a missing bound is open, at -inf or inf
            high = math.inf if self.high is None else self.high
            if (value < low or value > high or (value == low and (self.low_open or self.low is None))
                    or (value == high and (self.high_open or self.high is None)) or not math.isfinite(value)):
                fail("is out of range")  # inf too (config.json cannot store it), even at a closed bound
        return value


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizer slot returns at progress p. None keeps the base value."""

    lr_scale: float = 1.0
    beta1: float | None = None
    beta2: float | None = None


@dataclass(frozen=True)
class AuxModule:
    """What the ``aux_loss`` slot's build_aux returns: the inner module of the network whose output aux_loss
    reads (its name in ``model.named_modules()``), the extra trainable module, and `record`: what the run
    keeps of how it was built (method_trace.json's "aux", e.g. a frozen teacher's name and SHA-256)."""

    layer: str
    module: torch.nn.Module
    record: dict = field(default_factory=dict)


class Method:
    """Base class of every method plugin; as is, it is the baseline (fills no slot)."""

    name: ClassVar[str] = ""
    slots: ClassVar[frozenset] = frozenset()
    params: ClassVar[dict[str, Param]] = {}
    source: ClassVar[str] = ""
    weight_scale: ClassVar[str] = "normalised"
    ema_warmup: ClassVar[bool] = True

    def __init__(self, **overrides: Any):
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise HyperparameterError(
                f"method {self.name!r} has no hyperparameter {unknown[0]!r}; its hyperparameters: {known}"
            )
        self.hp = {k: p.default for k, p in self.params.items()}
        for key, value in overrides.items():
            self.hp[key] = self.params[key].parse(self.name, key, value)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several hyperparameters; raise HyperparameterError."""

    # -- slots ------------------------------------------------------------------------------
    def timestep_probs(self, p: float, schedule) -> torch.Tensor:
        """``timesteps`` slot: float64 tensor [T], non-negative, summing to 1 (a batch's marginal)."""
        return torch.full((schedule.T,), 1.0 / schedule.T, dtype=torch.float64)

    def sample_timesteps(self, u: np.ndarray, p: float, schedule) -> torch.Tensor:
        """``timesteps`` slot: the global batch's t (int64 [len(u)]) from one uniform per image.
        Default: each uniform by inverse CDF of timestep_probs, so methods at one seed share their
        random numbers (common random numbers)."""
        return inverse_cdf(self.timestep_probs(p, schedule), u)

    def loss_weights(self, t: torch.Tensor, p: float, schedule, target: str) -> torch.Tensor:
        """``weighting`` slot: float64 weights for the per-sample MSE on `target` at steps t."""
        return torch.ones(t.shape, dtype=torch.float64)

    def optimizer(self, p: float) -> OptimizerSettings:
        """``optimizer`` slot: learning-rate scale and Adam betas at progress p."""
        return OptimizerSettings()

    def ema_decay(self, p: float, base: float, step: int) -> float:
        """``ema`` slot: the EMA decay of update `step` (1-based: the optimizer updates done, this one
        included) at progress p, given the configured base decay."""
        return base

    def track_ema(self, step: int, model: torch.nn.Module) -> None:
        """``ema`` slot: sees the model after update `step` (process 0 only), for averages the method
        keeps itself (in state_dict, so they resume)."""

    def ema_snapshot(self, step: int) -> dict | None:
        """``ema`` slot: tensors to save as ``ema_snapshots/<step>.pt`` after update `step`, or None."""
        return None

    def stream_seed(self, seed: int) -> int:
        """``streams`` slot: the seed of the timestep and noise streams of a run with seed `seed`
        (initialisation, data order and flips keep the run's seed)."""
        return seed

    def assign_noise(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``noise`` slot: the noise for this process's images x0 (model range), given the drawn eps."""
        return eps

    def observe(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """``feedback`` slot: the global batch's t (int64, CPU) and unweighted per-sample losses
        (float64, CPU) of the step just taken, on every process."""

    def build_aux(self, model: torch.nn.Module, image_shape: tuple, dataset: str, data_dir) -> AuxModule:
        """``aux_loss`` slot: the inner layer to read and the extra trainable module (built once per run,
        after the seed's initial weights, on the CPU; the harness moves it to the device)."""
        raise NotImplementedError

    def aux_loss(self, aux: torch.nn.Module, activation: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``aux_loss`` slot: per-sample extra loss [B] (already scaled by the method's weight)."""
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the method has learned during training (tensors, numbers): saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""

    # -- description --------------------------------------------------------------------------
    def non_default_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.hp.items() if v != self.params[k].default}

    @property
    def label(self) -> str:
        """Folder-safe name that encodes every non-default hyperparameter, e.g. min_snr-gamma3."""
        parts = [self.name] + [f"{k}{_fmt(v)}" for k, v in sorted(self.non_default_params().items())]
        return "-".join(parts)


def distribution_problem(probs, T: int) -> str | None:
    """What is wrong with a distribution over the T timesteps, or None: a float tensor [T], finite,
    non-negative, with positive mass."""
    if not isinstance(probs, torch.Tensor) or tuple(probs.shape) != (T,):  # a list has no shape: name its type
        if isinstance(probs, torch.Tensor):
            return f"has shape {tuple(probs.shape)}, not ({T},)"
        return f"is a {type(probs).__name__}, not a tensor of shape ({T},)"
    if not bool(torch.isfinite(probs).all()):
        return "is not finite (NaN or Inf)"
    if bool((probs < 0).any()):
        return f"has negative entries (min {float(probs.min()):.3g})"
    if not float(probs.sum()) > 0:
        return "has no mass (all zero)"
    return None


def inverse_cdf(probs: torch.Tensor, u) -> torch.Tensor:
    """One index of `probs` per uniform in `u`, by inverse CDF (uniform u maps to the same quantile of
    every distribution, and the draw does not depend on how a generator is consumed)."""
    problem = distribution_problem(probs, len(probs) if isinstance(probs, torch.Tensor) and probs.ndim == 1 else -1)
    if problem:
        raise MethodOutputError(f"a timestep distribution {problem}; it must be finite, non-negative, with mass")
    cdf = torch.cumsum(probs.double(), 0)
    u = torch.as_tensor(u, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(probs) - 1)


# -- slot dispatch: the only way the harness calls a method ----------------------------------------


def _refuse(method: Method, hook: str, p: float, problem: str, rule: str) -> None:
    raise MethodOutputError(f"method {method.label}: {hook} at progress {p:g} {problem}; {rule}: fix the plugin "
                            "(the contract: bench/core/spec.py)")


def timestep_probs_at(method: Method, p: float, schedule) -> torch.Tensor:
    """The distribution over t at progress p: the method's if it fills ``timesteps``, else uniform."""
    if "timesteps" not in method.slots:
        return Method.timestep_probs(method, p, schedule)
    probs = method.timestep_probs(p, schedule)
    problem = distribution_problem(probs, schedule.T)
    if problem:
        _refuse(method, "timestep_probs", p, problem, "a distribution over t must be finite, non-negative, with mass")
    return probs


def sample_timesteps_at(method: Method, u: np.ndarray, p: float, schedule) -> torch.Tensor:
    """The global batch's timesteps from its uniforms: the method's if it fills ``timesteps``."""
    if "timesteps" not in method.slots:
        return inverse_cdf(Method.timestep_probs(method, p, schedule), u)  # uniform (not a combination's own hook)
    t = method.sample_timesteps(u, p, schedule)
    if (not isinstance(t, torch.Tensor) or tuple(t.shape) != (len(u),) or t.dtype.is_floating_point
            or (len(t) and (int(t.min()) < 0 or int(t.max()) >= schedule.T))):
        _refuse(method, "sample_timesteps", p, f"returned {type(t).__name__} {tuple(getattr(t, 'shape', ()))}",
                f"it must return {len(u)} integer timesteps in 0..{schedule.T - 1}")
    return t


def raw_loss_weights_at(method: Method, t: torch.Tensor, p: float, schedule, target: str) -> torch.Tensor:
    """The weights as the method writes them (before normalisation); 1 without ``weighting``."""
    if "weighting" not in method.slots:
        return torch.ones(t.shape, dtype=torch.float64)
    w = method.loss_weights(t, p, schedule, target)
    if not isinstance(w, torch.Tensor) or w.shape != t.shape:  # a list has no shape: name its type
        got = f"has shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else f"is a {type(w).__name__}, not a tensor,"
        _refuse(method, "loss_weights", p, f"{got} for {tuple(t.shape)} timesteps", "one weight per sample")
    elif not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        _refuse(method, "loss_weights", p, "has non-finite or negative weights", "weights must be finite and >= 0")
    return w


def check_outputs(method: Method, schedule, target: str) -> None:
    """Every hook that returns a distribution, timesteps or weights, called at the start, middle and end
    of training over all T steps: a broken plugin fails when a run is resolved, not mid-training."""
    t = torch.arange(schedule.T)
    for p in (0.0, 0.5, 1.0):
        timestep_probs_at(method, p, schedule)
        loss_weights_at(method, t, p, schedule, target)  # the raw weights, and their mean when normalised


def weight_norm_at(method: Method, p: float, schedule, target: str) -> float:
    """The divisor of a method's weights at p: their mean under its own sampling, sum_t p(t) w(t), for
    weight_scale "normalised" (1 for "source", and without ``weighting``)."""
    if "weighting" not in method.slots or method.weight_scale == "source":
        return 1.0
    w = raw_loss_weights_at(method, torch.arange(schedule.T), p, schedule, target)
    norm = float((timestep_probs_at(method, p, schedule) * w).sum())
    if not (math.isfinite(norm) and norm > 0):
        _refuse(method, "loss_weights", p, f"has mean {norm:g} under the method's own sampling",
                "normalised weights need a positive, finite mean (or weight_scale = \"source\")")
    return norm


def loss_weights_at(method: Method, t: torch.Tensor, p: float, schedule, target: str) -> torch.Tensor:
    """Per-sample loss weights: the method's if it fills ``weighting`` (normalised as it says), else 1."""
    w = raw_loss_weights_at(method, t, p, schedule, target)
    return w if "weighting" not in method.slots else w / weight_norm_at(method, p, schedule, target)


def optimizer_settings_at(method: Method, p: float, beta1: float, beta2: float) -> tuple[float, float, float]:
    """(lr_scale, beta1, beta2) at progress p, falling back to the configured betas."""
    if "optimizer" not in method.slots:
        return 1.0, beta1, beta2
    s = method.optimizer(p)
    return s.lr_scale, beta1 if s.beta1 is None else s.beta1, beta2 if s.beta2 is None else s.beta2


def ema_decay_at(method: Method, p: float, base: float, step: int) -> float:
    """The EMA decay of update `step` (1-based) at progress p: the method's if it fills ``ema``, else the
    configured one. A plugin written before the hook took the step (ema_decay(p, base)) still works."""
    if "ema" not in method.slots:
        return base
    if len(inspect.signature(method.ema_decay).parameters) == 2:
        return method.ema_decay(p, base)
    return method.ema_decay(p, base, step)


def stream_seed_at(method: Method, seed: int) -> int:
    """The timestep and noise streams' seed: the method's if it fills ``streams``, else the run's."""
    return int(method.stream_seed(seed)) if "streams" in method.slots else seed


def assign_noise_at(method: Method, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The noise for the images x0: the method's if it fills ``noise``, else the drawn eps."""
    return method.assign_noise(x0, eps) if "noise" in method.slots else eps


def check_slots(cls: type) -> None:
    """Refuse a Method class that overrides a hook without declaring its slot (one-line error)."""
    unknown = sorted(set(cls.slots) - set(SLOTS))
    if unknown:
        raise ConfigError(f"method {cls.name!r} declares unknown slot {unknown[0]!r}; slots are "
                          f"{', '.join(SLOTS)}")
    if cls.weight_scale not in WEIGHT_SCALES:
        raise ConfigError(f"method {cls.name!r} has weight_scale {cls.weight_scale!r}; use one of "
                          f"{', '.join(WEIGHT_SCALES)}")
    for slot, hooks in HOOKS.items():
        for hook in hooks:
            if getattr(cls, hook) is not getattr(Method, hook) and slot not in cls.slots:
                raise ConfigError(
                    f"method {cls.name!r} overrides {hook}() but does not declare the {slot!r} slot, so the harness "
                    f"would never call it; add {slot!r} to its slots or remove the override")
    if "aux_loss" in cls.slots and (cls.build_aux is Method.build_aux or cls.aux_loss is Method.aux_loss):
        raise ConfigError(f"method {cls.name!r} declares the 'aux_loss' slot; it must define both build_aux() and "
                          "aux_loss()")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "_").replace(" ", "_")


def weight_from_eps(w_eps: torch.Tensor, snr: torch.Tensor, target: str) -> torch.Tensor:
    """Convert a weight on the eps-MSE to the given target (METHODS.md: w_x0 = w_eps * SNR,
    w_v = w_x0 / (SNR + 1)); finite at SNR = 0 and at SNR = inf."""
    if target == "eps":
        return w_eps
    w_x0 = w_eps * snr
    if target == "x0":
        return w_x0
    return w_eps * (snr / (snr + 1))


def weight_from_x0(w_x0: torch.Tensor, snr: torch.Tensor, target: str) -> torch.Tensor:
    """Convert a weight on the x0-MSE to the given target (w_eps = w_x0 / SNR, w_v = w_x0 / (SNR + 1))."""
    if target == "x0":
        return w_x0
    if target == "eps":
        return w_x0 / snr
    return w_x0 / (snr + 1)


def progress_ramp(p: float, ramp: float) -> float:
    """min(1, p / ramp): the fraction of a schedule that is complete at progress p."""
    return min(1.0, max(0.0, p) / ramp)


def observe_at(method: Method, t: torch.Tensor, losses: torch.Tensor) -> None:
    """Feed the step's global t and unweighted per-sample losses back to a ``feedback`` method."""
    if "feedback" in method.slots:
        method.observe(t, losses)


def track_ema_at(method: Method, step: int, model: torch.nn.Module) -> None:
    """Show the model after update `step` to an ``ema`` method's own averages."""
    if "ema" in method.slots:
        method.track_ema(step, model)


def ema_snapshot_at(method: Method, step: int) -> dict | None:
    """An ``ema`` method's snapshot to save after update `step`, or None."""
    return method.ema_snapshot(step) if "ema" in method.slots else None


def uses_ema_warmup(method: Method) -> bool:
    """Whether the configured EMA warm-up caps the method's decay (a method with its own warm-up says no)."""
    return "ema" not in method.slots or bool(method.ema_warmup)
