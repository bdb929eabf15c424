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
               baseline_extend = E                   (optional, >= 1: the baseline trains on to E x iters
                                                      with the same evaluation grid, so the report can
                                                      read how many baseline iterations a method's
                                                      result at the budget is worth; bench/report/speedup.py)
    [train]    any other TrainConfig setting: lr, warmup, grad_clip, ema_decay, schedule, T, ...,
               and where it runs: device, gpus, precision, compile (bench/core/runtime.py)
    [eval]     every (iterations between evaluations), metrics, num_images, sampler, ...
               (everything but `every` is the evaluator's spec, TrainConfig.eval)
    [report]   metric, baseline, fractions, targets (fractions of the budget whose baseline
               value is a speed-up target; default 0.5, 0.75, 1), headline (the target the headline
               is read at; default 0.75), bootstrap, confidence, seed
    [cost]     device, train_images_per_s, forward_ratio, startup_s, eval_overhead_s, setup_s
               (the dry-run's cost model)
    [slurm]    partition, gpus, time, account, qos, constraint, cpus_per_task, mem_gb,
               array_parallelism, max_num_timeout, setup, additional
    [tune]     lr_factors, seeds, methods, budget    (optional: each method's learning rate chosen on
                                                      tuning seeds first; bench/suite/tuning.py)

Everything is checked when the suite is loaded, before anything runs: unknown keys, wrong
types, unknown methods or datasets, bad hyperparameters. The error names the file, the key and
the reason (:class:`SuiteError`, a :class:`~bench.errors.ConfigError`).

This module imports torch only inside :func:`load_suite`'s validation (through
bench.train.resolve), never at import time.

The checks and schemas are in bench/suite/schema.py; the dry run's cost model in bench/suite/cost.py.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomllib

from bench.errors import BenchError
from bench.suite.schema import (
    BUDGET_SCHEMA,
    COST_SCHEMA,
    GRID_SCHEMA,
    LOG_SCHEMA,
    SLURM_SCHEMA,
    TUNE_SCHEMA,
    Checker,
    SuiteError,
    check_report_labels,
    parse_dataset_entries,
    parse_eval,
    parse_head,
    parse_method_entries,
    parse_report,
    parse_seeds,
    parse_train,
)
from bench.suite.tuning import parse_tune
from bench.train.run_folder import workload_name

SUITES_DIR = Path(__file__).resolve().parents[2] / "suites"

DEFAULT_SUITE = "mini"


@dataclass(frozen=True)
class MethodEntry:
    """One method of the grid: a registered name with hyperparameters, and its folder label."""

    name: str
    params: dict
    label: str
    train: dict = field(default_factory=dict)  # [train] settings this entry overrides (lr_sweep)
    budget_dependent: bool = False  # its schedule reads progress = step / iters (Method.budget_dependent)


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
    baseline_extend: float = 1.0  # the baseline's runs train to baseline_extend x iters
    log: dict = field(default_factory=dict)  # [log] to = "tensorboard" | "wandb": live logging of every run
    tune: dict | None = None  # [tune]: tuning by rule before the headline (bench/suite/tuning.py)
    lr_chosen: dict | None = None  # label -> learning rate, once tuning has chosen (the headline phase)
    _runs: list[RunSpec] = field(default_factory=list, repr=False)

    @property
    def file(self) -> str:
        return str(self.path) if self.path else f"<suite {self.name}>"

    @property
    def baseline(self) -> str | None:
        return self.report.get("baseline")

    def lr_sweep(self) -> dict[str, float]:
        """Label -> learning rate of the baseline's runs in [grid] lr_sweep (empty without a sweep)."""
        chosen = self.lr_chosen or {}  # a tuned method's lr is its tuning's choice, not a sweep entry
        sweep = {m.label: m.train["lr"] for m in self.methods if "lr" in m.train and m.label not in chosen}
        if sweep and self.baseline:
            sweep = {self.baseline: float(chosen.get(self.baseline, self.train.get("lr", _default_lr()))), **sweep}
        return sweep

    @property
    def baseline_iters(self) -> int:
        """Iterations of the baseline's runs: the budget times baseline_extend, rounded to an integer."""
        return int(round(self.iters * self.baseline_extend))

    def runs(self) -> list[RunSpec]:
        """Every run, workload by workload, then seed by seed, then method by method (so that an
        interrupted suite has whole seeds of every method first)."""
        if not self._runs:
            self._runs = [self._run(w, m, s) for w in self.workloads for s in self.seeds for m in self.methods]
        return list(self._runs)

    def subset(self, runs: list[RunSpec]) -> "Suite":
        """This suite restricted to `runs` (e.g. the ones --only selects): what a dry run's plan costs."""
        return replace(self, _runs=list(runs))

    def _run(self, w: Workload, m: MethodEntry, seed: int) -> RunSpec:
        cfg = copy.deepcopy(self.train)
        cfg.update(copy.deepcopy(w.overrides))
        cfg.update(copy.deepcopy(m.train))
        cfg.update(method=m.name, method_params=copy.deepcopy(m.params), dataset=w.dataset, resolution=w.resolution,
                   arch=w.arch, seed=seed, iters=self.iters, batch_size=self.batch_size,
                   eval_every=self.eval_every, eval=copy.deepcopy(self.eval))
        if m.label == self.baseline and self.baseline_iters > self.iters:
            # The extended baseline: the same run continued past the budget (its evaluation grid too).
            cfg.update(iters=self.baseline_iters, budget_iters=self.iters)
        return RunSpec(self.name, w.name, m.label, seed, cfg)

    def to_dict(self) -> dict:
        """The resolved suite (results/<suite>/suite.json; the report reads it, without torch)."""
        return {
            "name": self.name,
            "file": self.file,
            "description": self.description,
            "methods": [{"name": m.name, "params": m.params, "label": m.label, "train": m.train,
                         "budget_dependent": m.budget_dependent} for m in self.methods],
            "tune": self.tune, "lr_chosen": self.lr_chosen,
            "lr_sweep": self.lr_sweep(),
            "workloads": [{"name": w.name, "dataset": w.dataset, "resolution": w.resolution, "arch": w.arch,
                           **w.overrides} for w in self.workloads],
            "seeds": self.seeds,
            "budget": {"iters": self.iters, "batch_size": self.batch_size,
                       "images": self.iters * self.batch_size, "baseline_extend": self.baseline_extend,
                       "baseline_iters": self.baseline_iters},
            "train": self.train,
            "eval": {"every": self.eval_every, **self.eval},
            "report": self.report,
            "cost": self.cost,
            "slurm": self.slurm,
            "source_text": self.source_text,
        }


def available_suites(suites_dir: Path = SUITES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(suites_dir).glob("*.toml"))


def results_folder(target: str, results_root: Path) -> Path:
    """The results folder `report` reads for a target: a folder as given, or <results_root>/<suite
    name> for a suite's name or TOML file (the name inside the file, as `run` writes it)."""
    if Path(target).is_dir():
        return Path(target)
    name = target
    if target.endswith(".toml") and Path(target).is_file():
        try:
            name = tomllib.loads(Path(target).read_text(encoding="utf-8")).get("suite", {}).get("name") or Path(target).stem
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            name = Path(target).stem
    folder = Path(results_root) / name
    if not folder.is_dir():
        raise SuiteError(f"no results for {target!r} under {results_root} (looked for {folder}); run `python "
                         f"run_bench.py run {target}` first")
    return folder


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
    resolves every run through bench.train.resolve (imports torch).
    ``plugins`` (the command line's --plugins) are added to [train] plugins as absolute paths:
    they become part of every run's config, so worker processes and Slurm jobs, which rebuild a
    run from its config, load them too.
    """
    path = suite_path(name_or_path, suites_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not a text file (byte {exc.start} is not UTF-8); a suite is a TOML file such as "
                         "suites/mini.toml") from None
    except OSError as exc:
        raise SuiteError(f"{path}: cannot be read ({exc.strerror}); check the path and its permissions") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None
    train = data.get("train", {})
    if plugins and isinstance(train, dict) and isinstance(train.get("plugins", []), list):
        # The suite's own paths are relative to its file (as parse_train reads them), so both name
        # a plugin the same way and one given twice is loaded once.
        own = [p if not isinstance(p, str) or Path(p).is_absolute() else str((path.parent / p).resolve())
               for p in train.get("plugins", [])]
        extra = [str(Path(p).resolve()) for p in plugins]
        data = {**data, "train": {**train, "plugins": list(dict.fromkeys(own + extra))}}
    return parse_suite(data, path=path, source_text=text, validate=validate)


def parse_suite(data: dict, *, path: Path | None = None, source_text: str = "", validate: bool = True) -> Suite:
    """Build a Suite from parsed TOML (see the module docstring for the layout)."""
    ck = Checker(str(path) if path else "<suite>")
    name, head = parse_head(data, ck, path)
    grid = ck.table(data, "grid", GRID_SCHEMA, required=True)
    budget = ck.table(data, "budget", BUDGET_SCHEMA, required=True)
    ev = parse_eval(data, ck, validate)
    report = parse_report(data, ck, ev["metrics"])
    train = parse_train(data, ck, path, validate)
    seeds = parse_seeds(grid, ck)
    methods, labels = _methods(parse_method_entries(grid, ck), train.get("plugins", []), ck, validate)
    workloads = _workloads(*parse_dataset_entries(grid, ck), ck, validate)

    # The baseline must be a label of the grid when named; the default one may be absent (no speed-ups).
    if validate and "baseline" in data.get("report", {}) and report["baseline"] not in labels:
        ck.fail("report.baseline", f"{report['baseline']!r} is not a method label of the grid "
                                   f"({', '.join(labels)})")
    if validate and report["baseline"] not in labels:
        report["baseline"] = None
    if grid.get("lr_sweep"):
        methods += _lr_sweep_entries(grid, methods, report["baseline"], train, ck)
    if validate:
        check_report_labels(report, [m.label for m in methods], ck)

    suite = Suite(name=name, path=path, description=head.get("description", ""), methods=methods,
                  workloads=workloads, seeds=seeds, iters=budget["iters"], batch_size=budget["batch_size"],
                  train=train, eval_every=ev.pop("every"), eval=ev, report=report,
                  cost=ck.table(data, "cost", COST_SCHEMA), slurm=ck.table(data, "slurm", SLURM_SCHEMA),
                  log=ck.table(data, "log", LOG_SCHEMA),
                  source_text=source_text, jobs=head.get("jobs", 1),
                  baseline_extend=float(budget.get("baseline_extend", 1.0)),
                  tune=parse_tune(data, ck, TUNE_SCHEMA, methods, grid, budget["iters"], report["baseline"],
                                  lambda: train.get("lr", _default_lr())))
    if validate:
        _validate_runs(suite, ck)
        # imported here, as the module's other checks: a stated throughput above the device's peak
        from bench.suite.peaks import over_peak

        for key, reason in over_peak(suite):
            ck.fail(key, reason)
    return suite


def _methods(raw: list[tuple[str, str, dict]], plugins: list, ck: Checker,
             validate: bool) -> tuple[list[MethodEntry], dict[str, str]]:
    """The grid's methods resolved through the registry: labels, typed hyperparameters, no duplicates."""
    if not validate:
        return [MethodEntry(n, p, n) for _, n, p in raw], {}
    # torch on first use: a suite loads (report, dry run, runner) without torch
    from bench.core.registry import get_method
    from bench.train.resolve import method_table_hint

    methods, labels = [], {}
    for key, mname, params in raw:
        try:
            method = get_method(mname, params, plugins)
        except BenchError as exc:  # "laplace b=1": the error shows the { name = ..., b = 1 } table instead
            ck.fail(key, method_table_hint(mname) or str(exc))
        label = method.label
        # Store hyperparameters typed as the method parsed them (gamma = 3 -> 3.0), as the CLI does.
        params = {k: method.hp.get(k, v) for k, v in params.items()}
        if label in labels:
            ck.fail(key, f"method label {label!r} is already in the grid as {labels[label]}; "
                         "every grid entry must differ in name or hyperparameters")
        labels[label] = key
        methods.append(MethodEntry(mname, params, label, budget_dependent=bool(getattr(method, "budget_dependent", False))))
    return methods, labels


def _workloads(datasets: list[dict], archs: list[str], ck: Checker, validate: bool) -> list[Workload]:
    """One workload per dataset entry and architecture, named <dataset>-<resolution>_<arch>."""
    workloads = []
    for i, d in enumerate(datasets):
        res = shown = d.get("resolution")
        if shown is None and validate:
            # torch on first use: a suite loads (report, dry run, runner) without torch
            from bench.data.loading import dataset_info

            try:
                shown = dataset_info(d["name"]).RESOLUTION
            except BenchError as exc:
                ck.fail(f"grid.datasets[{i}].name", str(exc))
        for arch in archs:
            wname = workload_name(d["name"], shown, arch)
            if any(w.name == wname for w in workloads):
                ck.fail(f"grid.datasets[{i}]", f"workload {wname!r} appears twice")
            overrides = {k: d[k] for k in ("data_dir", "flip") if k in d}
            workloads.append(Workload(wname, d["name"], res, arch, overrides))
    return workloads


def _default_lr() -> float:
    # torch on first use: a suite loads (report, dry run, runner) without torch
    from bench.core.config import TrainConfig

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


def _check_networks(suite: Suite, ck: Checker) -> None:
    """Every architecture of the grid builds at its workload's resolution (on the meta device: nothing
    allocated, no data read), so a bad one fails before any run folder is written."""
    # torch on first use: a suite loads (report, dry run, runner) without torch
    import torch

    from bench.data.loading import dataset_info
    from bench.models.networks import build_model

    for w in suite.workloads:
        info = dataset_info(w.dataset)
        try:
            with torch.device("meta"):
                build_model(w.arch, info.CHANNELS, w.resolution or info.RESOLUTION)
        except BenchError as exc:
            ck.fail("grid.archs", f"{exc} (workload {w.name})")


def _validate_runs(suite: Suite, ck: Checker) -> None:
    """Resolve every run (bench.train.resolve, the one validation of methods, plugins, datasets and the
    evaluation spec); an [eval] problem is named as the table's, anything else as the run's."""
    # torch on first use: a suite loads (report, dry run, runner) without torch
    from bench.train.resolve import resolve_run

    _check_networks(suite, ck)
    seen = set()
    for run in suite.runs():
        if (run.workload, run.label) in seen:  # the checks do not depend on the seed
            continue
        seen.add((run.workload, run.label))
        where = f"{ck.file}: run {run.key}"
        try:
            resolve_run(run.config, where=where)
        except BenchError as exc:
            inner = str(exc).removeprefix(f"{where}: ")
            if inner.startswith("eval: "):
                ck.fail("eval", f"{inner.removeprefix('eval: ')} (run {run.key})")
            raise SuiteError(str(exc)) from None
