"""The method plugin contract.

A method is a subclass of :class:`Method` in one small file under ``methods/`` (or any file
or folder passed with ``--plugins``). It declares:

- ``name``: the registry key, unique; what ``--method`` accepts.
- ``slots``: the parts of training it changes, a subset of ``SLOTS``:
    * ``timesteps``: :meth:`Method.timestep_probs` returns the distribution over t.
    * ``weighting``: :meth:`Method.loss_weights` returns per-sample loss weights.
    * ``optimizer``: :meth:`Method.optimizer` returns the learning-rate scale and Adam betas.
    * ``ema``: :meth:`Method.ema_decay` returns the EMA decay.
    * ``streams``: :meth:`Method.stream_seed` returns the seed of the timestep and noise streams
      (the placebo's slot: the baseline on other random numbers, same initialisation and data).
  The harness calls only the hooks of declared slots; an undeclared slot keeps the baseline
  behaviour (uniform t, weight 1, base optimizer, base EMA decay).
- ``params``: typed hyperparameters with defaults and allowed ranges (:class:`Param`).
  Instances are built with keyword overrides, validated, and read from ``self.hp``.
- ``source``: where the definition comes from, and which parts are our reconstruction.

The harness calls a method only through the four ``*_at`` functions below (the slot dispatch):
an undeclared slot gets the baseline's behaviour there. A class that overrides a hook without
declaring its slot is refused when it is registered (:func:`check_slots`), because the harness
would silently never call that hook.

Every hook is a pure function of its arguments: training progress ``p`` in [0, 1]
(iterations done / iteration budget), the :class:`~bench.core.diffusion.Schedule`, and for
weights the sampled timesteps and the prediction target. Purity is what makes ``describe``
exact and resume bit-for-bit: a method keeps no state between calls.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bench.errors import ConfigError, HyperparameterError

SLOTS = ("timesteps", "weighting", "optimizer", "ema", "streams")
#: the hook each slot fills
HOOKS = {"timesteps": "timestep_probs", "weighting": "loss_weights", "optimizer": "optimizer", "ema": "ema_decay",
         "streams": "stream_seed"}


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
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                fail("is out of range")
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                fail("is out of range")
        return value


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizer slot returns at progress p. None keeps the base value."""

    lr_scale: float = 1.0
    beta1: float | None = None
    beta2: float | None = None


class Method:
    """Base class of every method plugin; as is, it is the baseline (fills no slot)."""

    name: ClassVar[str] = ""
    slots: ClassVar[frozenset] = frozenset()
    params: ClassVar[dict[str, Param]] = {}
    source: ClassVar[str] = ""

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
        """``timesteps`` slot: float64 tensor [T], non-negative, summing to 1."""
        return torch.full((schedule.T,), 1.0 / schedule.T, dtype=torch.float64)

    def loss_weights(self, t: torch.Tensor, p: float, schedule, target: str) -> torch.Tensor:
        """``weighting`` slot: float64 weights for the per-sample MSE on `target` at steps t."""
        return torch.ones(t.shape, dtype=torch.float64)

    def optimizer(self, p: float) -> OptimizerSettings:
        """``optimizer`` slot: learning-rate scale and Adam betas at progress p."""
        return OptimizerSettings()

    def ema_decay(self, p: float, base: float) -> float:
        """``ema`` slot: the EMA decay at progress p, given the configured base decay."""
        return base

    def stream_seed(self, seed: int) -> int:
        """``streams`` slot: the seed of the timestep and noise streams of a run with seed `seed`
        (initialisation, data order and flips keep the run's seed)."""
        return seed

    # -- description --------------------------------------------------------------------------
    def non_default_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.hp.items() if v != self.params[k].default}

    @property
    def label(self) -> str:
        """Folder-safe name that encodes every non-default hyperparameter, e.g. min_snr-gamma3."""
        parts = [self.name] + [f"{k}{_fmt(v)}" for k, v in sorted(self.non_default_params().items())]
        return "-".join(parts)


# -- slot dispatch: the only way the harness calls a method ----------------------------------------


def timestep_probs_at(method: Method, p: float, schedule) -> torch.Tensor:
    """The distribution over t at progress p: the method's if it fills ``timesteps``, else uniform."""
    if "timesteps" in method.slots:
        return method.timestep_probs(p, schedule)
    return Method.timestep_probs(method, p, schedule)


def loss_weights_at(method: Method, t: torch.Tensor, p: float, schedule, target: str) -> torch.Tensor:
    """Per-sample loss weights: the method's if it fills ``weighting``, else 1."""
    if "weighting" in method.slots:
        return method.loss_weights(t, p, schedule, target)
    return torch.ones(t.shape, dtype=torch.float64)


def optimizer_settings_at(method: Method, p: float, beta1: float, beta2: float) -> tuple[float, float, float]:
    """(lr_scale, beta1, beta2) at progress p, falling back to the configured betas."""
    if "optimizer" not in method.slots:
        return 1.0, beta1, beta2
    s = method.optimizer(p)
    return s.lr_scale, beta1 if s.beta1 is None else s.beta1, beta2 if s.beta2 is None else s.beta2


def ema_decay_at(method: Method, p: float, base: float) -> float:
    """The EMA decay at progress p: the method's if it fills ``ema``, else the configured one."""
    return method.ema_decay(p, base) if "ema" in method.slots else base


def stream_seed_at(method: Method, seed: int) -> int:
    """The timestep and noise streams' seed: the method's if it fills ``streams``, else the run's."""
    return int(method.stream_seed(seed)) if "streams" in method.slots else seed


def check_slots(cls: type) -> None:
    """Refuse a Method class that overrides a hook without declaring its slot (one-line error)."""
    unknown = sorted(set(cls.slots) - set(SLOTS))
    if unknown:
        raise ConfigError(f"method {cls.name!r} declares unknown slot {unknown[0]!r}; slots are "
                                  f"{', '.join(SLOTS)}")
    for slot, hook in HOOKS.items():
        if getattr(cls, hook) is not getattr(Method, hook) and slot not in cls.slots:
            raise ConfigError(
                f"method {cls.name!r} overrides {hook}() but does not declare the {slot!r} slot, so the harness "
                f"would never call it; add {slot!r} to its slots or remove the override")


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
