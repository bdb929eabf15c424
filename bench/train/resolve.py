"""A run, resolved once: the one place that turns a run's configuration (a suite's grid entry or
the command line) into everything a run needs, checked.

:func:`resolve_run` builds the TrainConfig (types and ranges), loads the plugins the config
names, instantiates the method (hyperparameters checked), finds the dataset, resolves the
evaluation spec against the run's chain length, and makes the run's record (config.json). The
CLI, the suite loader, the runner, worker processes, Slurm jobs and ``bench.train.loop.train`` all
take a :class:`ResolvedRun`; a process that receives only the config (a worker, a job) resolves
it here too, so plugins are found wherever the run executes. An error names where the bad value
came from (``where``: the suite file and run key, or "command line") and says how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bench.core.config import TrainConfig
from bench.core.diffusion import make_schedule
from bench.core.eval_steps import evaluates
from bench.core.registry import get_method
from bench.core.spec import Method, check_outputs
from bench.data.loading import cache_dir, dataset_info
from bench.errors import BenchError, ConfigError
from bench.eval.spec import resolve_spec
from bench.train.batches import DRAWS
from bench.train.live_log import check_log_env


@dataclass(frozen=True)
class ResolvedRun:
    """A checked run: config, method instance, evaluation spec (None: no evaluation), record."""

    config: TrainConfig
    method: Method
    eval_spec: dict | None
    record: dict


def resolve_run(config, where: str = "config") -> ResolvedRun:
    """Resolve a TrainConfig or its dict; raise one BenchError line prefixed with `where`."""
    # Types and ranges first (their errors already name `where`), then what needs the registries.
    if isinstance(config, TrainConfig):  # a config built in code may hold a Path or a tuple
        config = json.loads(json.dumps(config.to_dict(), default=str))
    cfg = TrainConfig.from_dict(config, where=where)
    try:
        run = _resolve(json.dumps(cfg.to_dict(), sort_keys=True), os.environ.get("DIFFBENCH_CACHE"))
        # The process's environment, before any folder is written (not cached: it may change).
        check_log_env()
        if run.eval_spec is not None:
            check_cache(Path(run.eval_spec["cache_dir"]), explicit="cache_dir" in cfg.eval)
    except BenchError as exc:  # unknown method or dataset, bad hyperparameter or evaluation spec
        raise type(exc)(f"{where}: {exc}") from None
    # Callers get their own copies (a method may learn during training: each run trains its own). The
    # method's file is hashed again: it may have been edited since this process cached the run.
    return ResolvedRun(copy.deepcopy(run.config), copy.deepcopy(run.method), copy.deepcopy(run.eval_spec),
                       {**copy.deepcopy(run.record), "method_sha256": method_sha256(run.method)})


@lru_cache(maxsize=256)
def _resolve(key: str, cache_env: str | None) -> ResolvedRun:
    """Once per process, config and evaluation cache folder ($DIFFBENCH_CACHE, which the spec's
    cache_dir comes from): a suite's checks, conflict test and run share the method."""

    cfg = TrainConfig.from_dict(json.loads(key))
    dataset_info(cfg.dataset)
    schedule = make_schedule(cfg.schedule, cfg.T, cfg.zero_terminal_snr)  # a schedule with no valid noise levels
    method = get_method(cfg.method, cfg.method_params, cfg.plugins)
    check_outputs(copy.deepcopy(method), schedule, cfg.target)  # a broken plugin fails here, before any folder
    # Hyperparameters as the method typed them ("3" from the command line -> 3.0), so config.json,
    # the label and the method agree whatever the entry point.
    cfg = dataclasses.replace(cfg, method_params={k: method.hp.get(k, v) for k, v in cfg.method_params.items()})
    spec = None
    if evaluates(cfg.eval, cfg.eval_every):
        spec = resolve_spec(evaluator_spec(cfg), T=cfg.T)
        # num_classes is the data's, known when training starts; guidance needs labels to mix with.
        if spec["guidance_scale"] != 1.0 and not cfg.class_cond:
            raise ConfigError("eval: guidance_scale needs a class-conditional run (class_cond = true)")
        if spec["guidance_scale"] != 1.0 and cfg.p_uncond == 0:
            raise ConfigError("eval: guidance_scale mixes in the null label's output, which p_uncond = 0 never "
                              "trains; set p_uncond (e.g. 0.1) or guidance_scale = 1")
    return ResolvedRun(cfg, method, spec, json.loads(json.dumps(run_record(cfg, method), default=str)))


def run_record(cfg: TrainConfig, method: Method | None = None) -> dict:
    """config.json: the config plus what the method resolved to."""
    method = method or get_method(cfg.method, cfg.method_params, cfg.plugins)
    return {**cfg.to_dict(), "method_label": method.label, "method_slots": sorted(method.slots),
            "method_resolved_params": dict(method.hp), "method_source": method.source,
            "method_sha256": method_sha256(method), "draws": DRAWS}


def method_sha256(method: Method) -> str:
    """SHA-256 of the file that defines the method's class (a built-in's or a plugin's): config.json keeps
    it, so a finished run whose method's code changed since is not counted as done (run_folder.config_diff)."""
    return hashlib.sha256(Path(inspect.getfile(type(method))).read_bytes()).hexdigest()


def evaluator_spec(cfg: TrainConfig) -> dict:
    """The evaluation spec of a run: its `eval` table, on the run's own data and resolution."""
    resolution = cfg.resolution or dataset_info(cfg.dataset).RESOLUTION
    return {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "resolution": resolution, **cfg.eval}


def method_table_hint(entry: str) -> str:
    """For a suite's method entry with its hyperparameters written into the name ("laplace b=1"): the
    table form that sets them, as a sentence; "" for any other entry."""
    name, pairs = re.match(r"\s*([\w.-]*)", entry).group(1), re.findall(r"(\w+)\s*=\s*([^\s,;()]+)", entry)
    if not name or not pairs:
        return ""

    def toml(value: str) -> str:  # a number or boolean as written, anything else as a string
        try:
            float(value)
            return value
        except ValueError:
            return value if value in ("true", "false") else json.dumps(value.strip("'\""))

    table = ", ".join([f'name = "{name}"', *(f"{k} = {toml(v)}" for k, v in pairs)])
    return (f"method entry {entry!r} writes hyperparameters into the name; a method with hyperparameters is a "
            f"table: methods = [{{ {table} }}]")


def cache_origin(path: Path, explicit: bool = False) -> tuple[str, str]:
    """(where a cache folder's path comes from, how to change it): [eval] cache_dir, $DIFFBENCH_CACHE or
    the default under $HOME."""
    if explicit:
        return f"the evaluation's cache_dir {path}", "set [eval] cache_dir to a writable folder"
    if os.environ.get("DIFFBENCH_CACHE"):
        return (f"the cache {path} (DIFFBENCH_CACHE={os.environ['DIFFBENCH_CACHE']})",
                "point DIFFBENCH_CACHE at a writable folder")
    return (f"the default cache {path} (under HOME={os.environ.get('HOME', '~')})",
            "make HOME writable, or set DIFFBENCH_CACHE to a writable folder")


def check_cache(path: Path, explicit: bool = False) -> None:
    """One ConfigError line when `path` cannot be made and written (a file on its way, no write permission):
    checked before a run writes anything, so the run is not left half-started."""
    first = path
    while not first.exists() and first != first.parent:  # the nearest part that exists
        first = first.parent
    problem = (f"{first} is a file, not a folder" if not first.is_dir() else
               f"{first} is not writable" if not os.access(first, os.W_OK | os.X_OK) else None)
    if problem:
        where, fix = cache_origin(path, explicit)
        raise ConfigError(f"{where} cannot be made: {problem}; {fix}")


def cache_fix(filename) -> str | None:
    """For a file-system error on `filename`: which cache it is in and how to move it, or None outside the cache."""
    root = cache_dir().absolute()
    if filename and Path(os.fsdecode(filename)).absolute().is_relative_to(root):
        where, fix = cache_origin(root)
        return f"it is in {where}: {fix}"
    return None
