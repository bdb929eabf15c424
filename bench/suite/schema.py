"""The suite file's schema and its checks: which keys each table takes, of which type, and the
one-line error (file, key, reason) for anything else. Also the table-level parsing that needs
no registry (the [suite], [eval], [report], [train] tables, seeds, dataset entries).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import BenchError, ConfigError
from bench.eval.spec import DEFAULTS


class SuiteError(ConfigError):
    """A suite file that cannot be run: names the file, the key and the reason."""


class Checker:
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

BUDGET_SCHEMA = {"iters": (int, True, _positive), "batch_size": (int, True, _positive),
                 "baseline_extend": (float, False, lambda v: None if v >= 1 else "must be >= 1 (1: no extension)")}

EVAL_SCHEMA = {
    "every": (int, True, _positive),
    "metrics": (ListOf((str,)), True, _nonempty),
    "num_images": (int, False, _positive),
    "sampler": (str, False, None),
    "sampler_steps": (int, False, _positive),
    "eta": (float, False, _nonneg),
    "batch_size": (int, False, _positive),
    "ref_split": (str, False, None),
    "num_ref": ((int, str), False, lambda v: None if v == "all" or (isinstance(v, int) and v > 0)
                 else 'must be a number of images > 0 or "all"'),
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
    # pairs of grid labels compared with each other, paired over seeds (bench/report/compare.py)
    "compare": (ListOf((list,)), False, lambda v: None if all(
        len(p) == 2 and all(isinstance(x, str) for x in p) and p[0] != p[1] for p in v)
        else 'must be pairs of two different method labels, e.g. [["laplace", "logit_normal"]]'),
    # the rule fixed in advance for the baseline's curve; the other is the report's sensitivity row
    "baseline_curve": (str, False, lambda v: None if v in ("raw", "monotone") else 'must be "raw" or "monotone"'),
    "labels": (dict, False, lambda v: None if all(isinstance(x, str) and x for x in v.values())
               else 'must map method labels to display names (non-empty strings), e.g. {laplace = "Laplace"}'),
    "style": (str, False, lambda v: None if v in ("paper", "default") else 'must be "paper" or "default"'),
}

COST_SCHEMA = {
    "device": (str, False, None),
    "train_images_per_s": (float, False, _positive),
    "arch_images_per_s": (dict, False, lambda v: None if all(isinstance(x, (int, float)) and x > 0 for x in v.values())
                          else "must map architecture names to training images/s > 0"),
    "forward_ratio": (float, False, _positive),
    "startup_s": (float, False, _nonneg),
    "eval_overhead_s": (float, False, _nonneg),
    "setup_s": (float, False, _nonneg),
    "device_tflops": (dict, False, lambda v: None if v and set(v) <= {"fp32", "tf32", "bf16"} and "fp32" in v
                      and all(isinstance(x, (int, float)) and x > 0 for x in v.values())
                      else "must map fp32 (and optionally tf32, bf16) to a GPU's peak TFLOP/s > 0"),
    "utilization": (float, False, lambda v: None if 0 < v <= 1 else "must be a fraction in (0, 1]"),
    "resize_images_per_s": (float, False, _positive),
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

LOG_SCHEMA = {  # live logging of every run (bench/train/live_log.py); --log on the command line wins
    "to": (str, True, lambda v: None if v in ("tensorboard", "wandb") else "must be \"tensorboard\" or \"wandb\""),
}

TUNE_SCHEMA = {  # tuning by rule before the headline (bench/suite/tuning.py)
    "lr_factors": (ListOf((float,)), False, lambda v: None if v and all(x > 0 for x in v)
                   else "must be factors > 0 of each method's learning rate, e.g. [0.5, 1, 2]"),
    "seeds": (ListOf((int,)), True, _nonempty),
    "methods": (ListOf((str,)), False, _nonempty),
    "budget": (int, False, _positive),
}

TOP_LEVEL = ("suite", "grid", "budget", "train", "eval", "report", "cost", "slurm", "log", "tune")

DATASET_KEYS = {"name": (str, True, None), "resolution": (int, False, lambda v: None if v >= 4 else "must be >= 4"),
                "data_dir": (str, False, None), "flip": (bool, False, None)}

REPORT_DEFAULTS = {"baseline": "baseline", "fractions": [0.25, 0.5, 0.75, 1.0], "targets": [0.5, 0.75],
                   "headline": 0.75, "bootstrap": 2000,
                   "confidence": 0.95, "seed": 0, "compare": [], "baseline_curve": "raw",
                   "labels": {}, "style": "paper"}

#: TrainConfig keys that the grid, the budget and [eval] set; [train] may not set them
GRID_KEYS = ("method", "method_params", "dataset", "resolution", "arch", "seed", "iters", "budget_iters",
             "batch_size", "eval", "eval_every")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

def _train_fields() -> list[str] | None:
    try:
        import dataclasses

        # torch on first use: the report reads the schema without torch
        from bench.core.config import TrainConfig
    except ImportError:
        return None
    return [f.name for f in dataclasses.fields(TrainConfig)]

def _evaluator_keys() -> dict:
    """The evaluator's spec keys with their defaults (bench.eval.spec.DEFAULTS), less the workload's."""
    return {k: v for k, v in DEFAULTS.items() if k not in EVAL_WORKLOAD_KEYS}


def check_finite(value, key: str, ck: Checker) -> None:
    """Refuse TOML's inf and nan (and 1e400, which reads as inf) anywhere in the suite: no setting means
    them, and config.json would store them as null. A method's hyperparameters are left to its own
    ranges (bench/core/spec.py), which name what they allow."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}" if key else k, ck)
    elif isinstance(value, list) and key != "grid.methods":
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]", ck)
    elif isinstance(value, float) and not math.isfinite(value):
        fix = "grad_clip = 0 turns clipping off" if key == "train.grad_clip" else "give a finite number"
        ck.fail(key, f"must be a finite number, got {value!r}; {fix}")


#: a suite's name is a folder of the results; runs' paths below it must stay under the file system's
#: 255-byte limit for a name and leave room for the workload, label and seed folders
MAX_NAME = 100


def parse_head(data: dict, ck: Checker, path: Path | None) -> tuple[str, dict]:
    """The [suite] table and the suite's name (its file's stem when not given)."""
    for k in data:
        if k not in TOP_LEVEL:
            ck.fail(k, f"unknown table; known tables: {', '.join('[' + t + ']' for t in TOP_LEVEL)}")
    check_finite(data, "", ck)
    head = ck.table(data, "suite", SUITE_SCHEMA)
    name = head.get("name") or (path.stem if path else "")
    if not name or not _NAME_RE.match(name):
        ck.fail("suite.name", f"{name!r} is not a folder-safe name (letters, digits, '.', '_', '-')")
    if len(name) > MAX_NAME:
        where = "suite.name" if head.get("name") else "suite.name (the file's name, when [suite] names none)"
        ck.fail(where, f"is {len(name)} characters long; a suite's name (its results folder) may have at most "
                       f"{MAX_NAME}: give a shorter name = \"...\" in [suite]")
    return name, head


def parse_eval(data: dict, ck: Checker, validate: bool) -> dict:
    """The [eval] table: `every` and the evaluator's spec (bench/eval/spec.py checks its values)."""
    ev_schema = dict(EVAL_SCHEMA)
    if validate:
        # Every other key of the evaluator's spec (bench/eval/spec.py), checked by its resolve_spec.
        for k, default in _evaluator_keys().items():
            kind = object if default is None else float if isinstance(default, float) else type(default)
            ev_schema.setdefault(k, (kind, False, None))
    for k in EVAL_WORKLOAD_KEYS:
        if isinstance(data.get("eval"), dict) and k in data["eval"]:
            ck.fail(f"eval.{k}", "is set by [grid] datasets (the evaluation uses the workload's data set)")
    return ck.table(data, "eval", ev_schema, required=True)


def parse_report(data: dict, ck: Checker, metrics: list[str]) -> dict:
    """The [report] table with its defaults; the headline must be one of the targets."""
    report = {**REPORT_DEFAULTS, **ck.table(data, "report", REPORT_SCHEMA)}
    report["fractions"] = [float(f) for f in report["fractions"]]
    report["targets"] = sorted({float(f) for f in report["targets"]})
    report["headline"] = float(report["headline"])
    if report["headline"] not in report["targets"]:
        ck.fail("report.headline", f"{report['headline']} is not among report.targets {report['targets']}")
    report["confidence"] = float(report["confidence"])
    if report.get("metric") is None:
        report["metric"] = metrics[0]
    elif report["metric"] not in metrics:
        ck.fail("report.metric", f"{report['metric']!r} is not among [eval] metrics {metrics}")
    return report


def check_report_labels(report: dict, labels, ck: Checker) -> None:
    """[report] compare and labels name method labels of the grid (lr_sweep's included)."""
    for key, names in [("report.compare", [x for p in report["compare"] for x in p]),
                       ("report.labels", list(report["labels"]))]:
        for x in names:
            if x not in labels:
                ck.fail(key, f"{x!r} is not a method label of the grid ({', '.join(labels)}); use one of those")


def parse_train(data: dict, ck: Checker, path: Path | None, validate: bool) -> dict:
    """[train]: any TrainConfig field the grid does not own; types are checked by TrainConfig."""
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
            ck.fail(f"train.{k}", f"is set by {GRID_KEY_OWNERS[k]}, not in [train] (so every method gets the same "
                                  "budget)")
        if fields is not None and k not in fields:
            known = ", ".join(f for f in fields if f not in GRID_KEYS)
            ck.fail(f"train.{k}", f"unknown training setting; known: {known}")
    if validate and fields is not None:
        _check_train_values(train, data.get("budget"), ck)
    return dict(train)


def _check_train_values(train: dict, budget, ck: Checker) -> None:
    """Each [train] value's type, then its range beside the keys that are valid alone and the
    budget's batch size: checks across keys (p_uncond needs class_cond, batch_size divisible by gpus)
    see the suite's values, not the defaults."""
    # torch on first use: the report reads the schema without torch
    from bench.core.config import TrainConfig

    def error(check, d: dict) -> str | None:
        try:
            check(d, where="[train]")
        except BenchError as exc:
            return str(exc).removeprefix("[train]: ")
        return None

    for k, v in train.items():
        reason = error(TrainConfig.typed_values, {k: v})
        if reason is not None:
            ck.fail(f"train.{k}", reason)
    context = {k: v for k, v in train.items() if error(TrainConfig.from_dict, {k: v}) is None}
    if isinstance(budget, dict) and type(budget.get("batch_size")) is int:
        context["batch_size"] = budget["batch_size"]
    reason = error(TrainConfig.from_dict, context)
    if reason is not None:  # values valid alone that clash; the reason names them
        ck.fail("train", reason)
    for k, v in train.items():
        reason = error(TrainConfig.from_dict, {**context, k: v})
        if reason is not None:
            ck.fail(f"train.{k}", reason)


GRID_KEY_OWNERS = {"iters": "[budget]", "budget_iters": "[budget] baseline_extend", "batch_size": "[budget]", "eval": "[eval]", "eval_every": "[eval] every",
                   "seed": "[grid] seeds", "method": "[grid] methods", "method_params": "[grid] methods",
                   "dataset": "[grid] datasets", "resolution": "[grid] datasets", "arch": "[grid] archs"}


def parse_seeds(grid: dict, ck: Checker) -> list[int]:
    # torch on first use: the report reads the schema without torch
    from bench.core.config import MAX_SEED

    seeds = list(grid["seeds"])
    for i, s in enumerate(seeds):
        if not 0 <= s <= MAX_SEED:  # the streams derived from a seed must fit torch.manual_seed
            ck.fail(f"grid.seeds[{i}]", f"{s} is not in [0, {MAX_SEED}] (2**32 - 1); pick a smaller seed")
    if len(set(seeds)) != len(seeds):
        ck.fail("grid.seeds", f"repeats a seed: {seeds}")
    return seeds


def parse_method_entries(grid: dict, ck: Checker) -> list[tuple[str, str, dict]]:
    """(key, name, hyperparameters) of each grid method: a name, or {name = ..., key = value, ...}."""
    raw = []
    for i, m in enumerate(grid["methods"]):
        key = f"grid.methods[{i}]"
        if isinstance(m, str):
            raw.append((key, m, {}))
            continue
        if "name" not in m or not isinstance(m["name"], str):
            ck.fail(key, "a method table needs name = \"<method>\" (e.g. {name = \"min_snr\", gamma = 3.0})")
        raw.append((key, m["name"], {k: v for k, v in m.items() if k != "name"}))
    return raw


def parse_dataset_entries(grid: dict, ck: Checker) -> tuple[list[dict], list[str]]:
    """The grid's dataset tables {name, resolution, data_dir, flip} and its architectures."""
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
    return datasets, archs
