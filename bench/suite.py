"""Benchmark suites as data: TOML files that name a grid of runs under one compute budget.

A suite is methods x datasets x architectures x seeds. Every run of a workload (a dataset at a
resolution, trained with an architecture) gets the same budget, ``iters x batch_size`` images,
so methods are compared at equal images seen. Layout of a suite file (see suites/mini.toml)::

    [suite]    name, description
    [grid]     methods  = ["baseline", "p2", {name = "min_snr", gamma = 3.0}, ...]
               datasets = ["fashion-mnist", {name = "cifar10", resolution = 32, flip = true}]
               archs    = ["unet-tiny"]
               seeds    = [0, 1, 2, 3]
               lr_sweep = [3e-4, 3e-3]               (optional: the baseline again at these learning
                                                      rates, labelled baseline-lr<value>; the report
                                                      shows the best-tuned baseline)
    [budget]   iters, batch_size                     (the same for every method)
    [train]    any other TrainConfig setting: lr, warmup, grad_clip, ema_decay, schedule, T, ...
    [eval]     every (iterations between evaluations), metrics, num_images, sampler, ...
               (everything but `every` is the evaluator's spec, TrainConfig.eval)
    [report]   metric, baseline, fractions, targets (fractions of the budget whose baseline
               value is a speed-up target; default 0.5, 0.75, 1), headline (the target the headline
               is read at; default 0.75), bootstrap, confidence, seed
    [cost]     device, train_images_per_s, forward_ratio, startup_s, eval_overhead_s, setup_s
               (the dry-run's cost model)
    [slurm]    partition, gpus, time, account, qos, constraint, cpus_per_task, mem_gb,
               array_parallelism, max_num_timeout, setup, additional

Everything is checked when the suite is loaded, before anything runs: unknown keys, wrong
types, unknown methods or datasets, bad hyperparameters. The error names the file, the key and
the reason (:class:`SuiteError`, a :class:`~bench.errors.ConfigError`).

This module imports torch only inside :func:`load_suite`'s validation (through bench.train and
bench.registry), never at import time.

Cost model of ``--dry-run`` (:func:`estimate_cost`), deliberately simple:

- training: ``iters * batch_size`` images at ``train_images_per_s`` (one optimizer step per
  image, forward + backward + EMA), from the suite's [cost] table or the built-in table
  :data:`TRAIN_IMAGES_PER_S` (measured on the project's 2-core CPU), scaled by
  ``(reference resolution / resolution)^2`` for other resolutions;
- sampling: every evaluation generates ``num_images`` images with ``sampler_steps`` network
  evaluations each; one network evaluation without backward costs ``1 / forward_ratio`` of a
  training image (default 2.5, measured for unet-tiny on the CPU; 3 is the textbook figure);
- fixed costs: ``startup_s`` per run (process start, data loading), ``eval_overhead_s`` per
  evaluation (feature extraction of the generated images, metric arithmetic), and ``setup_s``
  once per suite (the evaluator's first-time setup: training the proxy feature extractor or
  computing reference statistics; cached under results/.cache afterwards, so counted only
  while no run of the suite has finished).
Evaluations happen every ``eval.every`` iterations and at the end (as bench.train does).
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from bench.budget import eval_steps, evaluates
from bench.errors import ConfigError

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
DEFAULT_SUITE = "mini"

#: training throughput (images/s) by architecture at a reference resolution, on the project's
#: 2-core CPU (unet-tiny measured with batch 32, forward + backward + Adam step; ddpm-unet
#: extrapolated from its FLOPs). A suite's [cost] table overrides these.
TRAIN_IMAGES_PER_S = {
    "unet-tiny": (16, 450.0),
    "ddpm-unet": (32, 6.0),
}
DEFAULT_FORWARD_RATIO = 2.5
DEFAULT_STARTUP_S = 5.0
DEFAULT_EVAL_OVERHEAD_S = 1.0

#: TrainConfig keys that the grid, the budget and [eval] set; [train] may not set them
GRID_KEYS = ("method", "method_params", "dataset", "resolution", "arch", "seed", "iters", "batch_size",
             "eval", "eval_every")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SuiteError(ConfigError):
    """A suite file that cannot be run: names the file, the key and the reason."""


# ----------------------------------------------------------------------------------------------
# The suite's objects.


@dataclass(frozen=True)
class MethodEntry:
    """One method of the grid: a registered name with hyperparameters, and its folder label."""

    name: str
    params: dict
    label: str
    train: dict = field(default_factory=dict)  # [train] settings this entry overrides (lr_sweep)


@dataclass(frozen=True)
class Workload:
    """A dataset at a resolution, trained with an architecture: one budget, one baseline."""

    name: str              # e.g. "fashion-mnist-16_unet-tiny"
    dataset: str
    resolution: int | None  # None: the dataset's own
    arch: str
    overrides: dict         # data_dir / flip set by the dataset entry


@dataclass(frozen=True)
class RunSpec:
    """One training run: a point of the grid, with its complete TrainConfig as a dict."""

    suite: str
    workload: str
    label: str
    seed: int
    config: dict

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.label}/seed{self.seed}"

    def run_dir(self, results_root: str | os.PathLike = "results") -> Path:
        """results/<suite>/<workload>/<method-label>/seed<k>/"""
        return Path(results_root) / self.suite / self.workload / self.label / f"seed{self.seed}"

    def to_dict(self) -> dict:
        return {"suite": self.suite, "workload": self.workload, "label": self.label, "seed": self.seed,
                "config": self.config}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(d["suite"], d["workload"], d["label"], int(d["seed"]), d["config"])


@dataclass
class Suite:
    name: str
    path: Path | None
    description: str
    methods: list[MethodEntry]
    workloads: list[Workload]
    seeds: list[int]
    iters: int
    batch_size: int
    train: dict
    eval_every: int
    eval: dict
    report: dict
    cost: dict
    slurm: dict
    source_text: str = ""
    jobs: int = 1  # default parallel local runs (`run --jobs` overrides)
    _runs: list[RunSpec] = field(default_factory=list, repr=False)

    @property
    def file(self) -> str:
        return str(self.path) if self.path else f"<suite {self.name}>"

    @property
    def baseline(self) -> str | None:
        return self.report.get("baseline")

    def lr_sweep(self) -> dict[str, float]:
        """Label -> learning rate of the baseline's runs in [grid] lr_sweep (empty without a sweep)."""
        sweep = {m.label: m.train["lr"] for m in self.methods if "lr" in m.train}
        if sweep and self.baseline:
            sweep = {self.baseline: float(self.train.get("lr", _default_lr())), **sweep}
        return sweep

    def runs(self) -> list[RunSpec]:
        """Every run, workload by workload, then seed by seed, then method by method (so that an
        interrupted suite has whole seeds of every method first)."""
        if not self._runs:
            self._runs = [self._run(w, m, s) for w in self.workloads for s in self.seeds for m in self.methods]
        return list(self._runs)

    def _run(self, w: Workload, m: MethodEntry, seed: int) -> RunSpec:
        cfg = copy.deepcopy(self.train)
        cfg.update(copy.deepcopy(w.overrides))
        cfg.update(copy.deepcopy(m.train))
        cfg.update(method=m.name, method_params=copy.deepcopy(m.params), dataset=w.dataset, resolution=w.resolution,
                   arch=w.arch, seed=seed, iters=self.iters, batch_size=self.batch_size,
                   eval_every=self.eval_every, eval=copy.deepcopy(self.eval))
        return RunSpec(self.name, w.name, m.label, seed, cfg)

    def to_dict(self) -> dict:
        """The resolved suite (results/<suite>/suite.json; the report reads it, without torch)."""
        return {
            "name": self.name,
            "file": self.file,
            "description": self.description,
            "methods": [{"name": m.name, "params": m.params, "label": m.label, "train": m.train} for m in self.methods],
            "lr_sweep": self.lr_sweep(),
            "workloads": [{"name": w.name, "dataset": w.dataset, "resolution": w.resolution, "arch": w.arch,
                           **w.overrides} for w in self.workloads],
            "seeds": self.seeds,
            "budget": {"iters": self.iters, "batch_size": self.batch_size,
                       "images": self.iters * self.batch_size},
            "train": self.train,
            "eval": {"every": self.eval_every, **self.eval},
            "report": self.report,
            "cost": self.cost,
            "slurm": self.slurm,
            "source_text": self.source_text,
        }


# ----------------------------------------------------------------------------------------------
# Loading and validation.


def available_suites(suites_dir: Path = SUITES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(suites_dir).glob("*.toml"))


def suite_path(name_or_path: str | os.PathLike, suites_dir: Path = SUITES_DIR) -> Path:
    """A suite file from a name (suites/<name>.toml) or a path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file() or os.sep in str(name_or_path):
        if not p.is_file():
            raise SuiteError(f"{p}: no such suite file; shipped suites: {', '.join(available_suites(suites_dir))}")
        return p
    candidate = Path(suites_dir) / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise SuiteError(f"unknown suite {str(name_or_path)!r}; shipped suites: "
                         f"{', '.join(available_suites(suites_dir))} (or pass the path of a .toml file)")
    return candidate


def load_suite(name_or_path: str | os.PathLike = DEFAULT_SUITE, *, validate: bool = True,
               suites_dir: Path = SUITES_DIR, plugins=()) -> Suite:
    """Read, check and resolve a suite; raise SuiteError naming file, key and reason.

    With ``validate`` (the default) every run's TrainConfig is also built and checked, which
    resolves methods, hyperparameters and datasets through the registries (imports torch).
    ``plugins`` (the command line's --plugins) are added to [train] plugins as absolute paths:
    they become part of every run's config, so worker processes and Slurm jobs, which rebuild a
    run from its config, load them too.
    """
    path = suite_path(name_or_path, suites_dir)
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None
    if plugins:
        train = data.get("train", {})
        if isinstance(train, dict):
            own = train.get("plugins", [])
            extra = [str(Path(p).resolve()) for p in plugins]
            data = {**data, "train": {**train, "plugins": list(dict.fromkeys(
                (own if isinstance(own, list) else [own]) + extra))}}
    return parse_suite(data, path=path, source_text=text, validate=validate)


class _Checker:
    def __init__(self, file: str):
        self.file = file

    def fail(self, key: str, reason: str):
        raise SuiteError(f"{self.file}: key '{key}': {reason}")

    def table(self, data: dict, key: str, schema: dict[str, tuple], required: bool = False) -> dict:
        """Check a table's keys and value types against schema {key: (types, required, check)}."""
        if key not in data:
            if required:
                self.fail(key, f"missing table [{key}]")
            return {}
        tbl = data[key]
        if not isinstance(tbl, dict):
            self.fail(key, f"must be a table [{key}], got {_tname(tbl)}")
        for k in tbl:
            if k not in schema:
                self.fail(f"{key}.{k}", f"unknown key in [{key}]; known keys: {', '.join(schema)}")
        for k, (types, req, check) in schema.items():
            if k not in tbl:
                if req:
                    self.fail(f"{key}.{k}", f"missing (required in [{key}])")
                continue
            self.value(f"{key}.{k}", tbl[k], types, check)
        return dict(tbl)

    def value(self, key: str, value: Any, types, check=None):
        types = types if isinstance(types, tuple) else (types,)
        ok = any(_is(value, t) for t in types)
        if not ok:
            self.fail(key, f"must be {' or '.join(_tdesc(t) for t in types)}, got {value!r} ({_tname(value)})")
        if check is not None:
            why = check(value)
            if why:
                self.fail(key, why)


@dataclass(frozen=True)
class ListOf:
    """Schema type: a TOML array whose items are each of one of `types`."""

    types: tuple


def _is(value, t) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(t, ListOf):
        return isinstance(value, list) and all(any(_is(v, u) for u in t.types) for v in value)
    return isinstance(value, t)


def _tdesc(t) -> str:
    if isinstance(t, ListOf):
        names = {str: "strings", int: "integers", float: "numbers", bool: "booleans", dict: "tables"}
        return "a list of " + " or ".join(names.get(u, u.__name__) for u in t.types)
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}.get(t, t.__name__)


def _tname(value) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean", int: "integer", float: "float"}.get(
        type(value), type(value).__name__)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _nonneg(v):
    return None if v >= 0 else "must be >= 0"


def _nonempty(v):
    return None if len(v) > 0 else "must not be empty"


def _slurm_time(v):
    try:
        parse_slurm_time(v)
    except ValueError as exc:
        return str(exc)
    return None


def parse_slurm_time(value: int | str) -> int:
    """Slurm time limit in minutes, from minutes or "MM", "HH:MM:SS", "D-HH:MM:SS", "D-HH"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be > 0 minutes")
        return value
    s = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ValueError(f"{value!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + math.ceil(int(c or 0) / 60)
    elif c is not None:    # HH:MM:SS
        minutes = int(a) * 60 + int(b) + math.ceil(int(c) / 60)
    elif b is not None:    # MM:SS
        minutes = int(a) + math.ceil(int(b) / 60)
    else:                  # MM
        minutes = int(a)
    if minutes <= 0:
        raise ValueError("must be > 0 minutes")
    return minutes


SUITE_SCHEMA = {"name": (str, False, None), "description": (str, False, None), "jobs": (int, False, _positive)}
GRID_SCHEMA = {
    "methods": (ListOf((str, dict)), True, _nonempty),
    "datasets": (ListOf((str, dict)), True, _nonempty),
    "archs": (ListOf((str,)), True, _nonempty),
    "seeds": (ListOf((int,)), True, _nonempty),
    "lr_sweep": (ListOf((float,)), False,
                 lambda v: None if v and all(x > 0 for x in v) else "must be learning rates > 0"),
}
BUDGET_SCHEMA = {"iters": (int, True, _positive), "batch_size": (int, True, _positive)}
EVAL_SCHEMA = {
    "every": (int, True, _positive),
    "metrics": (ListOf((str,)), True, _nonempty),
    "num_images": (int, False, _positive),
    "sampler": (str, False, None),
    "sampler_steps": (int, False, _positive),
    "eta": (float, False, _nonneg),
    "batch_size": (int, False, _positive),
    "ref_split": (str, False, None),
    "num_ref": (int, False, _positive),
}
#: [eval] keys that the workload sets (the evaluator's reference data is the training data set)
EVAL_WORKLOAD_KEYS = ("dataset", "data_dir", "resolution")
REPORT_SCHEMA = {
    "metric": (str, False, None),
    "baseline": (str, False, None),
    "fractions": (ListOf((float,)), False,
                  lambda v: None if v and all(0 < f <= 1 for f in v) else "must be fractions in (0, 1]"),
    "targets": (ListOf((float,)), False,
                lambda v: None if v and all(0 < f <= 1 for f in v) else "must be fractions in (0, 1]"),
    "headline": (float, False, lambda v: None if 0 < v <= 1 else "must be a fraction in (0, 1]"),
    "bootstrap": (int, False, _nonneg),
    "confidence": (float, False, lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
    "seed": (int, False, _nonneg),
}
COST_SCHEMA = {
    "device": (str, False, None),
    "train_images_per_s": (float, False, _positive),
    "forward_ratio": (float, False, _positive),
    "startup_s": (float, False, _nonneg),
    "eval_overhead_s": (float, False, _nonneg),
    "setup_s": (float, False, _nonneg),
}
SLURM_SCHEMA = {
    "partition": (str, False, None),
    "gpus": (int, False, _nonneg),
    "time": ((int, str), False, _slurm_time),
    "account": (str, False, None),
    "qos": (str, False, None),
    "constraint": (str, False, None),
    "cpus_per_task": (int, False, _positive),
    "mem_gb": (float, False, _positive),
    "array_parallelism": (int, False, _positive),
    "max_num_timeout": (int, False, _nonneg),
    "setup": (ListOf((str,)), False, None),
    "additional": (dict, False, None),
}
TOP_LEVEL = ("suite", "grid", "budget", "train", "eval", "report", "cost", "slurm")
DATASET_KEYS = {"name": (str, True, None), "resolution": (int, False, lambda v: None if v >= 4 else "must be >= 4"),
                "data_dir": (str, False, None), "flip": (bool, False, None)}
REPORT_DEFAULTS = {"baseline": "baseline", "fractions": [0.25, 0.5, 0.75, 1.0], "targets": [0.5, 0.75, 1.0],
                   "headline": 0.75, "bootstrap": 2000,
                   "confidence": 0.95, "seed": 0}


def _default_lr() -> float:
    from bench.train import TrainConfig

    return TrainConfig().lr


def _lr_sweep_entries(grid: dict, methods: list[MethodEntry], baseline: str, train: dict, ck) -> list[MethodEntry]:
    """[grid] lr_sweep: the baseline again at each other learning rate, labelled <baseline>-lr<value>,
    so the report can show the best-tuned baseline beside the one every method shares."""
    base = next((m for m in methods if m.label == baseline), None)
    if base is None:
        ck.fail("grid.lr_sweep", f"needs the baseline {baseline!r} among [grid] methods")
    shared = float(train.get("lr", _default_lr()))
    out = []
    for lr in dict.fromkeys(float(v) for v in grid["lr_sweep"]):
        if lr != shared:
            out.append(MethodEntry(base.name, dict(base.params), f"{base.label}-lr{lr:g}", {"lr": lr}))
    return out


def _train_fields() -> list[str] | None:
    try:
        import dataclasses

        from bench.train import TrainConfig
    except ImportError:
        return None
    return [f.name for f in dataclasses.fields(TrainConfig)]


def parse_suite(data: dict, *, path: Path | None = None, source_text: str = "", validate: bool = True) -> Suite:
    """Build a Suite from parsed TOML (see the module docstring for the layout)."""
    file = str(path) if path else "<suite>"
    ck = _Checker(file)
    for k in data:
        if k not in TOP_LEVEL:
            ck.fail(k, f"unknown table; known tables: {', '.join('[' + t + ']' for t in TOP_LEVEL)}")

    head = ck.table(data, "suite", SUITE_SCHEMA)
    name = head.get("name") or (path.stem if path else "")
    if not name or not _NAME_RE.match(name):
        ck.fail("suite.name", f"{name!r} is not a folder-safe name (letters, digits, '.', '_', '-')")
    grid = ck.table(data, "grid", GRID_SCHEMA, required=True)
    budget = ck.table(data, "budget", BUDGET_SCHEMA, required=True)
    ev_schema = dict(EVAL_SCHEMA)
    if validate:
        # Every other key of the evaluator's spec (bench/evaluate.py), checked by its resolve_spec.
        for k, default in _evaluator_keys().items():
            kind = object if default is None else float if isinstance(default, float) else type(default)
            ev_schema.setdefault(k, (kind, False, None))
    for k in EVAL_WORKLOAD_KEYS:
        if isinstance(data.get("eval"), dict) and k in data["eval"]:
            ck.fail(f"eval.{k}", "is set by [grid] datasets (the evaluation uses the workload's data set)")
    ev = ck.table(data, "eval", ev_schema, required=True)
    report = {**REPORT_DEFAULTS, **ck.table(data, "report", REPORT_SCHEMA)}
    report["fractions"] = [float(f) for f in report["fractions"]]
    report["targets"] = sorted({float(f) for f in report["targets"]})
    report["headline"] = float(report["headline"])
    if report["headline"] not in report["targets"]:
        ck.fail("report.headline", f"{report['headline']} is not among report.targets {report['targets']}")
    report["confidence"] = float(report["confidence"])
    cost = ck.table(data, "cost", COST_SCHEMA)
    slurm = ck.table(data, "slurm", SLURM_SCHEMA)

    # [train]: any TrainConfig field the grid does not own; types are checked by TrainConfig.
    train = data.get("train", {})
    if not isinstance(train, dict):
        ck.fail("train", f"must be a table [train], got {_tname(train)}")
    plugins = train.get("plugins", [])
    if "plugins" in train and isinstance(plugins, list) and path is not None:
        # Plugin paths are relative to the suite file, so a suite works from any folder.
        plugins = [p if not isinstance(p, str) or Path(p).is_absolute() else str((path.parent / p).resolve())
                   for p in plugins]
        train = {**train, "plugins": plugins}
    fields = _train_fields()
    for k in train:
        if k in GRID_KEYS:
            where = {"iters": "[budget]", "batch_size": "[budget]", "eval": "[eval]", "eval_every": "[eval] every",
                     "seed": "[grid] seeds", "method": "[grid] methods", "method_params": "[grid] methods",
                     "dataset": "[grid] datasets", "resolution": "[grid] datasets", "arch": "[grid] archs"}[k]
            ck.fail(f"train.{k}", f"is set by {where}, not in [train] (so every method gets the same budget)")
        if fields is not None and k not in fields:
            known = ", ".join(f for f in fields if f not in GRID_KEYS)
            ck.fail(f"train.{k}", f"unknown training setting; known: {known}")
        if validate and fields is not None:
            from bench.errors import BenchError
            from bench.train import TrainConfig

            try:
                TrainConfig.from_dict({k: train[k]}, where="[train]")
            except BenchError as exc:
                ck.fail(f"train.{k}", str(exc).removeprefix("[train]: "))

    # Seeds.
    seeds = list(grid["seeds"])
    for i, s in enumerate(seeds):
        if s < 0:
            ck.fail(f"grid.seeds[{i}]", "must be >= 0")
    if len(set(seeds)) != len(seeds):
        ck.fail("grid.seeds", f"repeats a seed: {seeds}")

    # Methods: a name, or a table {name = ..., hyperparameter = value, ...}.
    raw_methods = []
    for i, m in enumerate(grid["methods"]):
        key = f"grid.methods[{i}]"
        if isinstance(m, str):
            raw_methods.append((key, m, {}))
        else:
            if "name" not in m or not isinstance(m["name"], str):
                ck.fail(key, "a method table needs name = \"<method>\" (e.g. {name = \"min_snr\", gamma = 3.0})")
            params = {k: v for k, v in m.items() if k != "name"}
            raw_methods.append((key, m["name"], params))

    # Datasets: a name, or a table {name, resolution, data_dir, flip}.
    datasets = []
    for i, d in enumerate(grid["datasets"]):
        key = f"grid.datasets[{i}]"
        if isinstance(d, str):
            d = {"name": d}
        ck.table({key: d}, key, DATASET_KEYS)
        datasets.append(d)
    archs = list(grid["archs"])
    if len(set(archs)) != len(archs):
        ck.fail("grid.archs", f"repeats an architecture: {archs}")

    plugins = train.get("plugins", [])
    methods = []
    labels: dict[str, str] = {}
    if validate:
        from bench.errors import BenchError
        from bench.registry import get_method

        for key, mname, params in raw_methods:
            try:
                method = get_method(mname, params, plugins)
            except BenchError as exc:
                ck.fail(key, str(exc))
            label = method.label
            # Store hyperparameters typed as the method parsed them (gamma = 3 -> 3.0), as the CLI does.
            params = {k: method.hp.get(k, v) for k, v in params.items()}
            if label in labels:
                ck.fail(key, f"method label {label!r} is already in the grid as {labels[label]}; "
                             "every grid entry must differ in name or hyperparameters")
            labels[label] = key
            methods.append(MethodEntry(mname, params, label))
    else:
        methods = [MethodEntry(n, p, n) for _, n, p in raw_methods]

    workloads = []
    for i, d in enumerate(datasets):
        res = d.get("resolution")
        shown = res
        if shown is None and validate:
            from bench.data import dataset_info
            from bench.errors import BenchError

            try:
                shown = dataset_info(d["name"]).RESOLUTION
            except BenchError as exc:
                ck.fail(f"grid.datasets[{i}].name", str(exc))
        for arch in archs:
            wname = f"{d['name']}-{shown}_{arch}" if shown else f"{d['name']}_{arch}"
            if any(w.name == wname for w in workloads):
                ck.fail(f"grid.datasets[{i}]", f"workload {wname!r} appears twice")
            overrides = {k: d[k] for k in ("data_dir", "flip") if k in d}
            workloads.append(Workload(wname, d["name"], res, arch, overrides))

    eval_every = ev.pop("every")
    if report.get("metric") is None:
        report["metric"] = ev["metrics"][0]
    elif report["metric"] not in ev["metrics"]:
        ck.fail("report.metric", f"{report['metric']!r} is not among [eval] metrics {ev['metrics']}")
    if validate and "baseline" in data.get("report", {}) and report["baseline"] not in labels:
        ck.fail("report.baseline", f"{report['baseline']!r} is not a method label of the grid "
                                   f"({', '.join(labels)})")
    if validate and report["baseline"] not in labels:
        report["baseline"] = None  # default baseline absent: the report has no speed-up section
    if grid.get("lr_sweep"):
        methods += _lr_sweep_entries(grid, methods, report["baseline"], train, ck)

    suite = Suite(name=name, path=path, description=head.get("description", ""), methods=methods,
                  workloads=workloads, seeds=seeds, iters=budget["iters"], batch_size=budget["batch_size"],
                  train=dict(train), eval_every=eval_every, eval=ev, report=report, cost=cost, slurm=slurm,
                  source_text=source_text, jobs=head.get("jobs", 1))
    if validate:
        _validate_runs(suite, ck)
    return suite


def _validate_runs(suite: Suite, ck: _Checker) -> None:
    """Build every run's TrainConfig (types, ranges, datasets, methods) and the evaluator's spec."""
    from bench.errors import BenchError
    from bench.train import TrainConfig

    seen = set()
    for run in suite.runs():
        # The checks depend on the workload and method, not on the seed.
        sig = (run.workload, run.label)
        if sig in seen:
            continue
        seen.add(sig)
        try:
            TrainConfig.from_dict(run.config, where=f"{ck.file}: run {run.key}")
        except BenchError as exc:
            msg = str(exc)
            raise SuiteError(msg if msg.startswith(ck.file) else f"{ck.file}: run {run.key}: {msg}") from None
    from bench.evaluate import resolve_spec
    from bench.sampling import check_sampler_args

    try:
        spec = resolve_spec(suite.eval)
    except BenchError as exc:
        ck.fail("eval", str(exc).removeprefix("eval: "))
    for T in sorted({r.config.get("T", 1000) for r in suite.runs()}):
        try:
            check_sampler_args(spec["sampler"], spec["sampler_steps"], spec["eta"], T,
                               spec["ddpm_variance"], spec["timestep_spacing"])
        except BenchError as exc:
            ck.fail("eval.sampler_steps", f"{str(exc).removeprefix('eval: ')} (T = {T})")


def _evaluator_keys() -> dict:
    """The evaluator's spec keys with their defaults (bench.evaluate.DEFAULTS), less the workload's."""
    from bench.evaluate import DEFAULTS

    return {k: v for k, v in DEFAULTS.items() if k not in EVAL_WORKLOAD_KEYS}


# ----------------------------------------------------------------------------------------------
# Cost estimate (dry run).


@dataclass
class RunCost:
    train_images: int
    eval_points: int
    sample_images: int
    network_evals: int
    train_s: float
    sample_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.train_s + self.sample_s + self.overhead_s


def train_throughput(suite: Suite, run: RunSpec) -> float:
    """Training images per second assumed for a run (see the module docstring)."""
    if "train_images_per_s" in suite.cost:
        return float(suite.cost["train_images_per_s"])
    arch = run.config["arch"]
    ref_res, ips = TRAIN_IMAGES_PER_S.get(arch, (16, 100.0))
    res = run.config.get("resolution") or _native_resolution(run.config["dataset"]) or ref_res
    return ips * (ref_res / res) ** 2


def _native_resolution(dataset: str) -> int | None:
    try:
        from bench.data import dataset_info

        return dataset_info(dataset).RESOLUTION
    except Exception:
        return None


def run_cost(suite: Suite, run: RunSpec) -> RunCost:
    cfg = run.config
    ev = cfg.get("eval") or {}
    every = cfg.get("eval_every", 0)
    points = len(eval_steps(cfg["iters"], every)) if evaluates(ev, every) else 0
    n_img = int(ev.get("num_images", 0)) * points
    nfe = n_img * int(ev.get("sampler_steps", 1))
    ips = train_throughput(suite, run)
    forward_ratio = float(suite.cost.get("forward_ratio", DEFAULT_FORWARD_RATIO))
    overhead = float(suite.cost.get("startup_s", DEFAULT_STARTUP_S)) + points * float(
        suite.cost.get("eval_overhead_s", DEFAULT_EVAL_OVERHEAD_S))
    train_images = cfg["iters"] * cfg["batch_size"]
    return RunCost(train_images, points, n_img, nfe, train_images / ips, nfe / (ips * forward_ratio), overhead)


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
    lines.append(f"{'run':<{width}}  {'state':<8} {'train img':>12} {'sample img':>11} {'est. time':>10}")
    todo_s = est.setup_s if not any(v == "done" for v in states.values()) else 0.0
    for r, c in est.runs:
        state = states.get(r.key, "todo")
        if state != "done":
            todo_s += c.total_s
        lines.append(f"{r.key:<{width}}  {state:<8} {c.train_images:>12,} {c.sample_images:>11,} "
                     f"{format_duration(c.total_s):>10}")
    device = suite.cost.get("device", "the project's 2-core CPU")
    sample_s = sum(c.sample_s for _, c in est.runs)
    lines += ["",
              f"images to train: {est.train_images:,}; images to sample: {est.sample_images:,} "
              f"({est.network_evals:,} network evaluations)",
              f"estimated time on {device}: {format_duration(est.total_s)} ({est.total_s:,.0f} s) for all runs "
              f"(sampling {format_duration(sample_s)}"
              + (f", one-time evaluator setup {format_duration(est.setup_s)}" if est.setup_s else "")
              + f"); still to run: {format_duration(todo_s)}"
              + (f", about {format_duration(todo_s / jobs)} with {jobs} parallel jobs" if jobs > 1 else ""),
              "model: iters x batch / train_images_per_s + sampled images x sampler steps / "
              "(train_images_per_s x forward_ratio) + startup_s + eval points x eval_overhead_s, + setup_s once "
              "(see bench/suite.py)"]
    return "\n".join(lines)
