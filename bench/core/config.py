"""Every setting of a training run (:class:`TrainConfig`), saved as config.json beside its
results, with its type and range checks. What needs the registries (the method, its plugins,
the dataset, the evaluation spec) is checked by bench.train.resolve.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from bench.core.diffusion import SCHEDULES, TARGETS
from bench.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
#: settings of how a run executes, not of what it is: a folder's config.json may differ in them
RUNTIME_KEYS = ("device", "precision", "tf32", "fused_adamw", "channels_last", "compile", "runtime")
#: the largest seed: the streams derived from it (seed x 1,000,003 + offsets, bench/train) must stay
#: inside the 64-bit range torch.manual_seed takes, and 32 bits is what every other RNG takes too
MAX_SEED = 2**32 - 1


def check_device_name(name: str) -> str | None:
    """Why `name` is not a device setting (None when it is): auto, cpu, cuda or cuda:K."""
    if name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return None
    return "is not auto, cpu, cuda or cuda:K"


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
    class_cond: bool = False  # labels to the network's label embedding (the dataset must have labels)
    p_uncond: float = 0.0  # label dropout to the null label (classifier-free guidance), needs class_cond
    # Network and diffusion.
    arch: str = "unet-tiny"
    schedule: str = "linear"
    T: int = 1000
    target: str = "eps"
    zero_terminal_snr: bool = False
    # Optimisation: the compute budget is iters x batch_size images.
    iters: int = 1000
    budget_iters: int = 0  # the workload's budget when this run trains past it (an extended baseline); 0: iters
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
    eval: dict = field(default_factory=dict)  # the Evaluator's spec (bench/eval/spec.py)
    threads: int = 0  # 0: torch's default
    # Where and how it runs (bench/core/runtime.py). Except gpus, these do not make another run: a
    # run may resume on another device, and config.json's `runtime` list records each stretch.
    device: str = "auto"  # auto | cpu | cuda | cuda:K (auto: CUDA when torch sees a GPU)
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 autocast on CUDA, fp32 on the CPU)
    tf32: bool = True  # TF32 matmuls and convolutions (CUDA only)
    fused_adamw: bool = True  # fused AdamW kernel (CUDA only; the CPU uses foreach)
    channels_last: bool | str = "auto"  # true | false | auto (by network and device: runtime.CHANNELS_LAST_CUDA)
    compile: bool = False  # torch.compile of the network for training steps
    gpus: int = 1  # processes (one per GPU) that share each global batch of batch_size images

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        cfg = cls(**cls.typed_values(d, where))
        cfg.validate(where)
        return cfg

    @classmethod
    def typed_values(cls, d: dict, where: str = "config") -> dict:
        """`d` with each value checked against its field's type (an int where a float is due becomes
        a float); ranges and checks across keys are validate()'s."""
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
            if key == "channels_last":  # a flag, or "auto": by network and device (bench/core/runtime.py)
                if not (isinstance(value, bool) or value == "auto"):
                    raise ConfigError(f"{where}: key 'channels_last' must be true, false or \"auto\", got {value!r}")
                values[key] = value
                continue
            if key == "resolution":
                want = int
            if key == "data_dir":
                want = str
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{where}: key {key!r} must be {want.__name__}, got {value!r}")
            if want is float and not math.isfinite(value):  # config.json cannot store inf or NaN
                fix = "grad_clip = 0 turns clipping off" if key == "grad_clip" else "give a finite number"
                raise ConfigError(f"{where}: key {key!r} must be a finite number, got {value!r}; {fix}")
            values[key] = value
        return values

    @property
    def budget(self) -> int:
        """The workload's budget N: the iterations every method trains (an extended baseline goes on)."""
        return self.budget_iters or self.iters

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
        if self.seed > MAX_SEED:
            bad("seed", f"must be <= {MAX_SEED} (2**32 - 1): the random streams derived from it must fit torch's seeds")
        if not 0 <= self.budget_iters <= self.iters:
            bad("budget_iters", f"must be in [0, iters = {self.iters}] (0: the run's own iters)")
        if self.T < 2:
            bad("T", "must be >= 2")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        for key in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                bad(key, "must be in [0, 1)")
        if self.resolution is not None and self.resolution < 4:
            bad("resolution", "must be >= 4")
        why = check_device_name(self.device)
        if why:
            bad("device", why)
        if not isinstance(self.channels_last, bool) and self.channels_last != "auto":
            bad("channels_last", "is not true, false or \"auto\"")
        if self.precision not in PRECISIONS:
            bad("precision", f"is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.p_uncond < 1:
            bad("p_uncond", "must be in [0, 1)")
        if self.p_uncond > 0 and not self.class_cond:
            bad("p_uncond", "drops labels, and this run has none: set class_cond = true (--class-cond)")
        if self.gpus < 1:
            bad("gpus", "must be >= 1 (the number of processes, one per GPU)")
        if self.gpus > 1 and self.device.startswith("cuda:"):
            bad("device", f"names one GPU, and gpus={self.gpus} processes need one each: use device = \"cuda\" "
                          "or \"auto\" (process k takes GPU k of those it sees)")
        if self.batch_size % self.gpus:
            bad("batch_size", f"is not divisible by gpus={self.gpus}: batch_size is the global batch, split evenly "
                              f"over the processes; use a multiple of {self.gpus}")
        # The method, its plugins, the dataset and the evaluation spec are checked by bench.train.resolve.

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
