"""Tuning by rule (AlgoPerf's external tuning): a suite's [tune] table gives every tuned method a small
grid of learning rates, the choice is made on tuning seeds of its own, and the headline runs on the
held-out [grid] seeds at the chosen learning rate::

    [tune]
    lr_factors = [0.5, 1, 2]     # default: each method's learning rate x these factors
    seeds = [100, 101]           # required: tuning seeds, disjoint from [grid] seeds
    methods = ["baseline", ...]  # default: every grid label but the placebo's
    budget = 2000                # default: [budget] iters (tuning runs are never extended)

The rule. Each tuned method m and factor f is trained on every tuning seed to the tuning budget
(label ``<m>@lr<f>x``, under results/<suite>/tuning/, never beside the headline's folders). Its
score is the report's metric at the tuning budget (the mean over noise sets, as the headline's),
averaged over the tuning seeds; a diverged run scores +inf (that learning rate loses). The chosen
factor has the best score (lower is better: every metric of the evaluator is a distance); a tie goes
to the factor closest to 1 in log-scale. The baseline is tuned the same way. A placebo (method
``placebo``: the baseline on re-seeded streams) is the baseline's control, so it is not tuned but
takes the baseline's chosen factor; any other method left out of ``methods`` keeps its learning rate.

Two phases. The headline's configuration depends on the choice, so `run` trains the tuning runs
first, then the headline (bench/suite/runner.py). The choice is written, atomically, to
results/<suite>/tuning.json and read back on every later `run`: a recorded choice is never changed;
if the tuning runs now give another choice (a changed [tune] table, rerun tuning runs), `run` says so
and keeps the recorded one (delete tuning.json to choose again: the headline runs at the old learning
rate are then refused as another configuration, never mixed). A method whose tuning runs are not all
finished has no choice yet: its headline runs wait (not run; the command exits non-zero).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from bench import fileio
from bench.train.run_folder import is_diverged, read_status

DEFAULT_FACTORS = [0.5, 1.0, 2.0]
#: seeds must fit torch.manual_seed (bench.core.config.MAX_SEED), as [grid] seeds
MAX_SEED = 2**32 - 1
PLACEBO = "placebo"
#: evaluation extras the choice does not read: the tuning runs skip them
UNUSED_EVAL = ("sampler2", "final_num_images", "save_samples")


def parse_tune(data: dict, ck, schema: dict, methods: list, grid: dict, iters: int, baseline: str | None,
               base_lr) -> dict | None:
    """The [tune] table checked against the grid, with its defaults; None without one. `methods` are
    the grid's MethodEntry objects, `base_lr()` the shared learning rate (called only when needed)."""
    tbl = ck.table(data, "tune", schema)
    if not tbl:
        return None
    seeds = list(tbl["seeds"])
    for i, s in enumerate(seeds):
        if not 0 <= s <= MAX_SEED:
            ck.fail(f"tune.seeds[{i}]", f"{s} is not in [0, {MAX_SEED}] (2**32 - 1); pick a smaller seed")
    if len(set(seeds)) != len(seeds):
        ck.fail("tune.seeds", f"repeats a seed: {seeds}")
    shared = sorted(set(seeds) & set(grid.get("seeds") or []))
    if shared:
        ck.fail("tune.seeds", f"{shared} {'is' if len(shared) == 1 else 'are'} also [grid] seeds; tuning seeds must be "
                              "held out from the headline's: pick seeds that [grid] seeds does not list")
    if grid.get("lr_sweep"):
        ck.fail("tune", "[grid] lr_sweep and [tune] both vary the learning rate; keep one ([tune] tunes every method)")
    labels = [m.label for m in methods]
    chosen = tbl.get("methods") or [m.label for m in methods if m.name != PLACEBO]
    for i, label in enumerate(chosen):
        if label not in labels:
            ck.fail(f"tune.methods[{i}]", f"{label!r} is not a method label of the grid ({', '.join(labels)})")
    follow = {m.label: baseline for m in methods
              if m.name == PLACEBO and m.label not in chosen and baseline in chosen}
    factors = list(dict.fromkeys(float(f) for f in tbl.get("lr_factors", DEFAULT_FACTORS)))
    base = float(base_lr())
    return {"lr_factors": factors, "seeds": seeds, "methods": list(dict.fromkeys(chosen)), "follow": follow,
            "budget": int(tbl.get("budget", iters)),
            "base_lr": {m.label: float(m.train.get("lr", base)) for m in methods}}


def tuning_label(label: str, factor: float) -> str:
    return f"{label}@lr{factor:g}x"


def tuning_suite(suite):
    """The tuning phase as a suite of its own: every tuned method at every factor, on the tuning seeds,
    to the tuning budget, in results/<suite>/tuning/ (the name "<suite>/tuning")."""
    t = suite.tune
    entries = [dataclasses.replace(m, label=tuning_label(m.label, f), train={**m.train, "lr": t["base_lr"][m.label] * f})
               for m in suite.methods if m.label in t["methods"] for f in t["lr_factors"]]
    ev = {k: v for k, v in suite.eval.items() if k not in UNUSED_EVAL}
    return dataclasses.replace(suite, name=f"{suite.name}/tuning", methods=entries, seeds=list(t["seeds"]),
                               iters=t["budget"], baseline_extend=1.0, eval=ev, report={**suite.report, "baseline": None},
                               tune=None, lr_chosen=None, _runs=[])


def choose(values: dict[float, list[float | None]]) -> tuple[float, dict[float, float]]:
    """The chosen factor and each factor's score from {factor: per-seed values (None: diverged)}: the
    lowest mean, ties to the factor closest to 1 (log-scale)."""
    means = {f: (math.inf if any(v is None or not math.isfinite(v) for v in vs) else sum(vs) / len(vs))
             for f, vs in values.items()}
    best = min(means, key=lambda f: (means[f], abs(math.log(f)), f))
    return best, means


def read_tuning(tsuite, metric: str, results_root) -> dict[str, dict]:
    """{label: {"values": {factor: per-seed values}, "diverged": [...], "missing": [...]}} of the tuning runs."""
    out = {}
    t_budget = tsuite.iters
    for r in tsuite.runs():
        label, f = r.label.rsplit("@lr", 1)
        factor = float(f.removesuffix("x"))
        entry = out.setdefault(label, {"values": {}, "diverged": [], "missing": []})
        run_dir = r.run_dir(results_root)
        status = read_status(run_dir) or {}
        value = None
        if status.get("state") == "done":
            rows = [e for e in fileio.read_jsonl(run_dir / "evals.jsonl") if e.get("metric") == metric
                    and e.get("step") == t_budget and isinstance(e.get("value"), (int, float))]
            value = float(rows[-1]["value"]) if rows else None
            if value is None:
                entry["missing"].append(r.key)
        elif status.get("state") == "failed" and is_diverged(status):
            entry["diverged"].append(r.key)
        else:
            entry["missing"].append(r.key)
        entry["values"].setdefault(factor, []).append(value)
    return out


def decide(suite, results_root, say) -> dict:
    """Choices from the tuning runs merged with tuning.json's recorded ones (recorded ones win, a
    difference is said); tuning.json is rewritten, atomically, when a choice was added."""
    t, metric = suite.tune, suite.report["metric"]
    path = Path(results_root) / suite.name / "tuning.json"
    recorded = fileio.read_json(path) if path.exists() else {}
    spec = {"metric": metric, "budget": t["budget"], "lr_factors": t["lr_factors"], "seeds": t["seeds"]}
    if recorded and {k: recorded.get(k) for k in spec} != spec:
        say(f"tuning: {path} was chosen under another [tune] table or metric ({ {k: recorded.get(k) for k in spec} }); "
            "its recorded choices are kept; delete it to choose again")
    methods = dict(recorded.get("methods") or {})
    changed = False
    for label, got in read_tuning(tuning_suite(suite), metric, results_root).items():
        if got["missing"]:
            continue
        factor, means = choose(got["values"])
        fresh = {"factor": factor, "lr": t["base_lr"][label] * factor, "base_lr": t["base_lr"][label],
                 "means": {f"{f:g}": (None if math.isinf(m) else m) for f, m in means.items()},
                 "values": {f"{f:g}": v for f, v in got["values"].items()}, "diverged": got["diverged"]}
        old = methods.get(label)
        if old is None:
            methods[label], changed = fresh, True
        elif old["factor"] != factor or old.get("means") != fresh["means"]:
            say(f"tuning: the tuning runs of {label} now give lr x{factor:g} (means {fresh['means']}); "
                f"{path} recorded lr x{old['factor']:g} (means {old.get('means')}), which the headline keeps; "
                "delete it to choose again")
    if changed:
        fileio.write_json(path, {**spec, **{k: recorded[k] for k in spec if k in recorded}, "suite": suite.name,
                                 "rule": "lowest mean over the tuning seeds at the tuning budget; ties: factor closest to 1",
                                 "methods": methods, "follow": t["follow"]})
    return methods


def headline_suite(suite, methods: dict):
    """The suite at the chosen learning rates, and the labels still waiting for their choice."""
    t, entries, waiting = suite.tune, [], []
    for m in suite.methods:
        leader = m.label if m.label in t["methods"] else t["follow"].get(m.label)
        if leader is None:
            entries.append(m)
        elif leader in methods:
            lr = t["base_lr"][m.label] * methods[leader]["factor"]
            entries.append(dataclasses.replace(m, train={**m.train, "lr": lr}))
        else:
            waiting.append(m.label)
    chosen = {m.label: m.train.get("lr", t["base_lr"][m.label]) for m in entries}
    return dataclasses.replace(suite, methods=entries, lr_chosen=chosen, _runs=[]), waiting
