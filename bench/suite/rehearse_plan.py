"""The plan of a rehearsal (bench/suite/rehearse.py): a suite's TOML tables with only sizes shrunk, what
was shrunk, the relations between image counts (real and rehearsed) and the environment that makes
every rehearsal process build smaller networks; and the shrunk suite written back as TOML."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import tomllib

from bench.errors import ConfigError

TRAIN_MIN = 144          # a generated train split's size: REPA's teacher (the proxy classifier) trains in
#                          batches of 128, after a tenth is held out where there is no test split (128 / 0.9)
PROCESSES_MAX = 2        # every multi-process path runs with 2 processes as with 8, on a 2-core CPU
PER_PROCESS_BATCH = 2    # training images per process and step
SAMPLER_STEPS_MAX = 4
EVAL_BATCH = 2           # sampling batch: N images take several batches, as 50,000 take 100 of 500
CLASSES = 8              # classes of the generated ILSVRC-like set
REAL_SPLITS = {"cifar10": {"train": 50_000, "test": 10_000}, "imagenet128": {"train": 1_281_167}}
ITER_KEYS = ("warmup", "ckpt_every")  # [train] settings counted in iterations

ARCH_ENV = "DIFFBENCH_ARCH_OVERRIDES"
LIMIT_ENV = "DIFFBENCH_TRAIN_COMPUTE_LIMIT"
SIGNAL_ENV = "DIFFBENCH_REHEARSAL_SIGNAL_AT"
ATTEMPTS_ENV = "DIFFBENCH_REHEARSAL_ATTEMPTS"


@dataclass
class Plan:
    """The shrunk suite and what it takes to run it."""

    name: str                                   # the rehearsal's suite name, <suite>-rehearsal
    data: dict                                  # its TOML tables
    changes: list[str] = field(default_factory=list)      # "key: before -> after (why)"
    relations: list[str] = field(default_factory=list)    # image-count relations, kept or not
    broken: list[str] = field(default_factory=list)       # the relations not kept
    env: dict = field(default_factory=dict)     # environment of every rehearsal process
    datasets: list[tuple] = field(default_factory=list)  # (dataset, folder, {split: images}) to generate
    counts: dict = field(default_factory=dict)  # real image count -> rehearsed (count_map)


def small_network(settings: dict) -> dict:
    """Constructor arguments that shrink a registry network's width and depth, keeping its kind, its
    resolutions (down-samplings, attention, patch) and its conditioning."""
    net = settings.get("net", "ddpm")
    if net == "adm":  # GroupNorm over 32 groups: 32 channels at every level
        return {"model_channels": 32, "channel_mult": [1] * len(settings["channel_mult"]), "num_res_blocks": 1}
    if net == "dit":
        return {"depth": 2, "hidden": 32, "heads": 2}
    return {"ch": 16, "groups": 8, "num_res_blocks": 1}


def count_map(counts) -> dict[int, int]:
    """Real image counts -> the smallest counts (from 2, FID's least N) in the same order: equal ones stay
    equal, a larger one stays larger (CIFAR10's 10,000 test images and FID-10k -> 2, FID-50k -> 3)."""
    return {n: 2 + i for i, n in enumerate(sorted(set(counts)))}


def _eval_points(real_points: int, report: dict) -> int:
    """The fewest evaluation points on which every report fraction and target lies, if the real grid
    holds them too (else the real grid, capped at 8)."""
    fracs = [Fraction(f).limit_denominator(1000) for f in report.get("fractions", [0.25, 0.5, 0.75, 1.0])
             + report.get("targets", [0.5, 0.75]) + [report.get("headline", 0.75)]]
    points = math.lcm(*(f.denominator for f in fracs))
    return points if real_points % points == 0 else min(real_points, 8)


def _order(a: int, b: int) -> str:
    return "<" if a < b else "=" if a == b else ">"


def _relation(plan: Plan, what: str, real: tuple[int, int], small: tuple[int, int]) -> None:
    kept = _order(*real) == _order(*small)
    line = (f"{what}: {small[0]:,} {_order(*small)} {small[1]:,} (real: {real[0]:,} {_order(*real)} {real[1]:,})"
            f"{'' if kept else '  NOT KEPT'}")
    plan.relations.append(line)
    if not kept:
        plan.broken.append(line)


def _change(plan: Plan, table: dict, key: str, value, where: str, why: str = "") -> None:
    before = table.get(key, "(default)")
    if before != value:
        plan.changes.append(f"{where}.{key}: {before} -> {value}" + (f" ({why})" if why else ""))
    table[key] = value


def plan_rehearsal(data: dict, suite_file: Path, work: Path, seeds: int = 1) -> Plan:
    """The rehearsal of suite TOML `data` (read from `suite_file`), its generated data under `work`."""
    from bench.core.config import TrainConfig  # reason: the defaults of what a suite leaves unset
    from bench.eval.reference import TRAIN_COMPUTE_LIMIT
    from bench.models.networks import ARCHS

    data = json.loads(json.dumps(data))  # a copy (TOML holds nothing JSON lacks but dates)
    name = data.get("suite", {}).get("name") or suite_file.stem
    plan = Plan(f"{name}-rehearsal", data)
    data.setdefault("suite", {})["name"] = plan.name
    grid, budget, train, ev = data["grid"], data["budget"], data.setdefault("train", {}), data["eval"]
    train["plugins"] = [p if Path(p).is_absolute() else str((suite_file.parent / p).resolve())
                        for p in train.get("plugins", [])]  # relative to the suite's file, which moves
    if not train["plugins"]:
        del train["plugins"]
    _change(plan, grid, "seeds", grid["seeds"][:seeds], "grid", f"the first {seeds}")

    # Networks: smaller, of the same kind (every process reads the overrides from the environment).
    overrides = {arch: small_network(ARCHS[arch][0]) for arch in grid["archs"] if arch in ARCHS}
    for arch, o in overrides.items():
        plan.changes.append(f"network {arch}: " + ", ".join(f"{k} {ARCHS[arch][0].get(k)} -> {v}" for k, v in o.items()))
    plan.env[ARCH_ENV] = json.dumps(overrides)

    # Iterations: the evaluation grid at its fewest points; intervals keep their share of the budget.
    iters, every = budget["iters"], ev["every"]
    points = _eval_points(max(1, iters // every), {**data.get("report", {})})
    _change(plan, budget, "iters", points, "budget", f"{points} evaluation points, as {iters // every} of {every:,}")
    _change(plan, ev, "every", 1, "eval")
    defaults = TrainConfig()
    for key in ITER_KEYS:
        real = train.get(key, getattr(defaults, key))
        _change(plan, train, key, 0 if real == 0 else max(1, round(real * points / iters)), "train",
                "its share of the budget")
    gpus = train.get("gpus", 1)
    procs = min(gpus, PROCESSES_MAX)
    if procs != gpus:
        _change(plan, train, "gpus", procs, "train", f"{procs} gloo processes on this machine's CPU")
    if data.get("slurm", {}).get("gpus") == gpus and procs != gpus:
        _change(plan, data["slurm"], "gpus", procs, "slurm", "one task per process")
    _change(plan, budget, "batch_size", procs * PER_PROCESS_BATCH, "budget", f"{PER_PROCESS_BATCH} per process")
    real_ev = dict(ev)
    _shrink_eval(plan, ev, TRAIN_COMPUTE_LIMIT)
    _shrink_data(plan, grid["datasets"], work)
    if LIMIT_ENV in plan.env:
        _relations(plan, real_ev, ev, TRAIN_COMPUTE_LIMIT, gpus, procs)
    return plan


def _shrink_eval(plan: Plan, ev: dict, limit: int) -> None:
    """[eval]: sampler steps, sampling batch; the image counts only where all the data is generated."""
    from bench.eval.spec import DEFAULTS  # reason: N when the suite leaves it unset

    _change(plan, ev, "sampler_steps", min(ev.get("sampler_steps", DEFAULTS["sampler_steps"]), SAMPLER_STEPS_MAX),
            "eval")
    if isinstance(ev.get("sampler2"), dict):
        _change(plan, ev["sampler2"], "sampler_steps", min(ev["sampler2"].get("sampler_steps", 50), SAMPLER_STEPS_MAX),
                "eval.sampler2")
    _change(plan, ev, "batch_size", EVAL_BATCH, "eval")
    if not all(_dataset_name(d) in REAL_SPLITS for d in plan.data["grid"]["datasets"]):
        plan.changes.append("image counts: as they are (only cifar10 and imagenet128 are generated; other data is used "
                            "as it is)")
        return
    # A reference of as many images as its split has is all of it: said so, as scaling would make it a part.
    ref, n, split = ev.get("num_ref"), ev.get("num_images", DEFAULTS["num_images"]), ev.get("ref_split", "train")
    sizes = [REAL_SPLITS[_dataset_name(d)].get(split) for d in plan.data["grid"]["datasets"]]
    if ref != "all" and all(size is not None and (ref or n) >= size for size in sizes):
        _change(plan, ev, "num_ref", "all", "eval", f"{ref or n:,} reference images: all of the {split} split, as the real")
    # Every other count (N, the splits but train, a job's compute limit): the smallest in the same order.
    keys = [k for k in ("num_images", "final_num_images", "num_ref") + (("kid_subset_size",) if "kid" in ev["metrics"]
            else ()) if type(ev.get(k, DEFAULTS.get(k))) is int]
    splits = [n for d in plan.data["grid"]["datasets"] for s, n in REAL_SPLITS[_dataset_name(d)].items() if s != "train"]
    plan.counts = count_map([ev.get(k, DEFAULTS[k]) for k in keys] + splits + [limit])
    for key in keys:
        _change(plan, ev, key, plan.counts[ev.get(key, DEFAULTS[key])], "eval", "in the same order as the real counts")
    plan.env[LIMIT_ENV] = str(plan.counts[limit])
    plan.changes.append(f"a training job's compute limit: {limit:,} -> {plan.counts[limit]} images")


def _dataset_name(entry) -> str:
    return entry if isinstance(entry, str) else entry["name"]


def _shrink_data(plan: Plan, entries: list, work: Path) -> None:
    """Generated stand-ins for cifar10 and imagenet128, in their real formats: the train split of
    TRAIN_MIN images, the others as small as count_map makes them."""
    if LIMIT_ENV not in plan.env:
        return
    for i, entry in enumerate(entries):
        entry = entries[i] = {"name": entry} if isinstance(entry, str) else entry
        real = REAL_SPLITS[entry["name"]]
        small = {split: TRAIN_MIN if split == "train" else plan.counts[n] for split, n in real.items()}
        small["train"] += -small["train"] % 5 if entry["name"] == "cifar10" else 0  # cifar-10-batches-py: 5 batches
        where = work / "data" / ("cifar10" if entry["name"] == "cifar10" else "imagenet128-128")
        _change(plan, entry, "data_dir", str(where), f"grid.datasets[{i}]", "generated: " + ", ".join(
            f"{n:,} {s} images" for s, n in small.items()) + ("" if "test" in small else "; no test split, as the real"))
        plan.datasets.append((entry["name"], where, small))


def _relations(plan: Plan, real_ev: dict, ev: dict, limit: int, gpus: int, procs: int) -> None:
    """Each relation between image counts that decides which code runs, real and rehearsed: the order
    must be the same. The noise floor takes N real images outside the reference (the rest of the reference
    split, else the other split); a job computes features of at most `limit` images; REPA's teacher (the
    proxy classifier) trains on the train split in batches of `batch`, a tenth held out without a test split."""
    import inspect

    from bench.eval.proxy import train_proxy
    from bench.eval.spec import DEFAULTS

    batch = inspect.signature(train_proxy).parameters["batch_size"].default
    (n, final, ref, split), (sn, sfinal, sref, _) = ([spec.get(k, DEFAULTS[k]) for k in
                                                    ("num_images", "final_num_images", "num_ref", "ref_split")]
                                                   for spec in (real_ev, ev))
    for name, _, small in plan.datasets:
        real, other = REAL_SPLITS[name], "test" if split == "train" else "train"
        for label, rn, s in [("N", n, sn)] + ([("final N", final, sfinal)] if final else []):
            if sref == "all":
                plan.relations.append(f"{name}: the reference is all of the {split} split (as the real)")
            else:  # the reference (num_ref, else N images) and the floor's N from the rest of the split
                _relation(plan, f"{name}: reference + {label} vs its {split} split",
                          ((ref or rn) + rn, real[split]), ((sref or s) + s, small[split]))
            if other in real:
                _relation(plan, f"{name}: {label} vs its {other} split", (rn, real[other]), (s, small[other]))
            else:
                plan.relations.append(f"{name}: no {other} split (as the real)")
            _relation(plan, f"{name}: {label} vs a training job's compute limit", (rn, limit), (s, plan.counts[limit]))
        held = (lambda k: k - k // 10) if "test" not in real else (lambda k: k)  # a tenth held out, else none
        _relation(plan, f"{name}: teacher's train images vs its batch", (held(real["train"]), batch),
                  (held(small["train"]), batch))
    if final:
        _relation(plan, "final N vs N", (final, n), (sfinal, sn))
    if procs > 1:
        _relation(plan, "N vs processes (every process samples)", (min(n, gpus), gpus), (min(sn, procs), procs))
    plan.relations = list(dict.fromkeys(plan.relations))  # once each, for N and the final N alike


# -- the shrunk suite as a TOML file -------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"a suite value of type {type(v).__name__} cannot be written back ({v!r})")


def to_toml(data: dict, header: list[str]) -> str:
    """The suite's tables as TOML (comments: `header`), checked to read back as `data`."""
    lines = [f"# {h}" for h in header]
    for table, values in data.items():
        lines += ["", f"[{table}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != data:
        raise ConfigError("the rehearsal's suite does not read back as written (a bug of bench/suite/rehearse.py)")
    return text
