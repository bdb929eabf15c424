"""The report's header text: the verdicts first (bench/report/verdicts.py, compare.py), then what
every number is (metric, feature extractor and its hash, N, reference, sampler and its timesteps),
the training settings of each workload, and the machines the runs ran on. Files only, no torch.
"""

from __future__ import annotations

import math
import os
import platform

import pandas as pd

from bench.fileio import atomic_write_bytes
from bench.report.compare import compare_frame, compare_lines, compare_rows
from bench.report.intervals import BOOTSTRAP_MIN_SEEDS
from bench.report.speedup import lower_is_better
from bench.report.stats import PLACEBO
from bench.report.tables import read_json_or_none, to_markdown
from bench.report.verdicts import (
    CLIP_RATIO_MAX,
    FASTER,
    NO_TEST,
    NULL,
    OTHER_RULE,
    SLOWER,
    apply_rule,
    assess,
    settings,
)


def machine_lines(runs: list[dict]) -> list[str]:
    groups: dict[str, int] = {}
    for r in runs:
        m = r.get("machine")
        if not m:
            continue
        desc = f"{m.get('platform')}, {m.get('cpu_model') or m.get('processor')}, {m.get('cpu_count')} CPUs"
        if m.get("cpu_flags") is not None:
            desc += f" (instruction set: {', '.join(m['cpu_flags']) or 'none listed'}"
            desc += f"; torch CPU kernels {m['torch_cpu_capability']})" if m.get("torch_cpu_capability") else ")"
        if m.get("gpus"):
            desc += ", GPU: " + ", ".join(m["gpus"])
        if m.get("torch"):
            desc += f", torch {m['torch']} ({m.get('torch_threads')} threads)"
        groups[desc] = groups.get(desc, 0) + 1
    lines = [f"- runs ran on: {desc} ({n} run{'s' if n != 1 else ''})" for desc, n in groups.items()]
    if not lines:
        lines = ["- runs ran on: not recorded (no machine.json in the run folders)"]
    lines.append(f"- this report was built on: {platform.platform()}, {platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    return lines

def runtime_lines(runs: list[dict]) -> list[str]:
    """Device, processes and fast path of the training (config.json's `runtime` list), grouped."""
    groups: dict[str, int] = {}
    for r in runs:
        for rt in (r.get("config") or {}).get("runtime") or []:
            on = lambda flag: "on" if flag else "off"  # noqa: E731
            procs = rt.get("world_size", 1)
            desc = (f"{rt.get('device')} ({rt.get('device_name')}), {procs} process{'es' if procs != 1 else ''}"
                    + (f" ({rt.get('backend')})" if rt.get("backend") else "")
                    + f", {rt.get('precision')}, TF32 {on(rt.get('tf32'))}, channels_last {on(rt.get('channels_last'))}, "
                    f"fused AdamW {on(rt.get('fused_adamw'))}, torch.compile {on(rt.get('compile'))}")
            groups[desc] = groups.get(desc, 0) + 1
    if not groups:
        return ["- training device and fast path: not recorded (runs from before config.json's `runtime`)"]
    return [f"- training: {desc} ({n} run stretch{'es' if n != 1 else ''})" for desc, n in groups.items()]


def protocol_lines(evals: pd.DataFrame) -> list[str]:
    """What every metric is: feature extractor (and its weights' hash), N generated and reference
    images, the reference split, the sampler, and when it was evaluated."""
    lines = []
    if evals.empty:
        return ["- no evaluations recorded yet"]
    cols = [c for c in ("feature_extractor", "weights_sha1", "weights_sha256", "weights_shipped", "num_gen", "num_ref",
                        "ref_split", "sampler", "sampler_steps", "sample_precision", "timestep_spacing", "eta", "noise_seed", "fid_mode",
                        "ref_stats", "num_classes", "guidance_scale") if c in evals]
    for metric, g in evals.groupby("metric", sort=True):
        combos = g[cols].drop_duplicates() if cols else pd.DataFrame([{}])
        for _, c in combos.iterrows():
            d = {k: (None if (isinstance(v, float) and not math.isfinite(v)) else v) for k, v in c.to_dict().items()}

            def show(key, default="?"):
                v = d.get(key)
                if v is None:
                    return default
                return str(int(v)) if isinstance(v, float) and v.is_integer() and key != "eta" else str(v)

            features = show("feature_extractor")
            if d.get("weights_sha256"):
                where = {True: "shipped in bench/eval/proxy_weights", False: "trained on this machine"}.get(
                    d.get("weights_shipped"), "")
                features += f" (weights sha256 {str(d['weights_sha256'])[:16]}{', ' + where if where else ''})"
            elif d.get("weights_sha1"):
                features += f" (weights sha1 {str(d['weights_sha1'])[:12]})"
            sampler = f"sampler {show('sampler')} with {show('sampler_steps')} steps"
            if d.get("timestep_spacing"):
                sampler += f" ({show('timestep_spacing')} spacing)"
            if d.get("eta") is not None:
                sampler += f", eta {show('eta')}"
            if d.get("sample_precision"):
                sampler += f", network in {show('sample_precision')}"
            if d.get("noise_seed") is not None:
                sampler += f", fixed noise (seed {show('noise_seed')})"
            reference = (f"the external statistics {d['ref_stats']} ({show('num_ref')} images)" if d.get("ref_stats")
                         else f"{show('num_ref')} reference images of the {show('ref_split')} split")
            extra = f"; clean-fid mode {d['fid_mode']}" if d.get("fid_mode") else ""
            if d.get("num_classes"):
                extra += (f"; class-conditional, image i labelled i mod {show('num_classes')}, guidance scale "
                          f"{show('guidance_scale')}")
            lines.append(
                f"- **{metric}** ({'lower' if lower_is_better(metric) else 'higher'} is better): features "
                f"{features}; N = {show('num_gen')} generated images (EMA weights) against {reference}; "
                f"{sampler}{extra}")
        steps = sorted(int(s) for s in g.step.dropna().unique())
        shown = ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")
        lines.append(f"  evaluated at iterations {shown}")
    return lines

COMMON_KEYS = ("lr", "warmup", "grad_clip", "weight_decay", "beta1", "beta2", "ema_decay", "ema_warmup", "schedule", "T",
               "target", "zero_terminal_snr", "flip", "eval_every")

def training_lines(runs: list[dict], sweep: dict | None = None) -> list[str]:
    """One line per workload: its data, network, budget and the settings every method shares. A tuned
    suite's learning rates differ by method (its tuning's choices): then lr is listed per label."""
    lines = []
    by_workload: dict[str, dict] = {}
    extended: dict[str, dict] = {}
    lrs: dict[str, dict[str, float]] = {}
    for r in runs:
        if r["config"]:
            cfg = r["config"]
            if cfg.get("lr") is not None and r["label"] not in (sweep or {}):
                lrs.setdefault(r["workload"], {})[r["label"]] = cfg["lr"]
            if cfg.get("budget_iters") and cfg["budget_iters"] < cfg.get("iters", 0):
                extended.setdefault(r["workload"], {**cfg, "label": r["label"]})
            else:
                by_workload.setdefault(r["workload"], cfg)
    for w, ext in extended.items():
        by_workload.setdefault(w, {**ext, "iters": ext["budget_iters"]})  # only the extended baseline ran
    for w, cfg in sorted(by_workload.items()):
        images = (cfg.get("iters") or 0) * (cfg.get("batch_size") or 0)
        per_label = lrs.get(w, {})
        if len(set(per_label.values())) > 1:
            cfg = {**cfg, "lr": "per method, as its tuning chose (" + ", ".join(
                f"{label} {lr:g}" for label, lr in sorted(per_label.items())) + ")"}
        settings = ", ".join(f"{k} {cfg[k]}" for k in COMMON_KEYS if k in cfg)
        ext = extended.get(w)
        more = (f"; the baseline `{ext['label']}` trains on to {ext['iters']} iterations "
                f"({ext['iters'] / ext['budget_iters']:g}x the budget, the same evaluation grid continued)"
                if ext else "")
        lines.append(f"- **{w}**: dataset {cfg.get('dataset')} at resolution {cfg.get('resolution') or 'native'}, "
                     f"architecture {cfg.get('arch')}; budget {cfg.get('iters')} iterations x batch "
                     f"{cfg.get('batch_size')} = {images:,} images for every method{more}; {settings}")
    return lines


def speedup_text(rows, baseline, metric, budget, extend, early, kw, baseline_slots) -> list[str]:
    """What the speed-up table's numbers are, with this suite's budget, extension and seed counts."""
    n = rows[0]["n_paired"]
    conf = 100 * kw["confidence"]
    how = ("a t-interval on log speed-up (n - 1 degrees of freedom)" if 3 <= n < BOOTSTRAP_MIN_SEEDS else
           f"a paired bootstrap over seeds ({kw['n_boot']} resamples, RNG seed {kw['seed']})"
           if n >= BOOTSTRAP_MIN_SEEDS and kw["n_boot"] > 0 else
           "a t-interval on log speed-up" if n >= 3 else "no interval: fewer than 3 paired seeds (\"too few seeds\")")
    better = "negative" if lower_is_better(metric) else "positive"
    family = [r for r in rows if not r["is_baseline"] and not r["is_control"]]
    controls = [r["method_label"] for r in rows if r["is_control"]]
    ext = (f"`{baseline}` trained on to {extend:g}x the budget ({extend * budget:g} iterations) with the same "
           "evaluation grid, so a method can be worth up to that much" if extend > 1 else
           f"`{baseline}` was not extended past the budget ([budget] baseline_extend = 1), so no speed-up above 1x "
           "can be shown (a seed that beats its baseline seed is '>= 1x')")
    same_run = ("; its schedule does not depend on training progress (warm-up and EMA warm-up count iterations), "
                "so its first iterations are those of a run that stops at the budget" if not baseline_slots else
                f"; it fills the slots {', '.join(baseline_slots)}, whose schedules follow training progress, so the "
                f"extended baseline is its own run at {extend:g}x the budget, not the budget's run continued")
    text = [f"### Paired speed-up over `{baseline}` ({metric})",
            f"Seeds are paired: seed k of a method shares initialisation, data order, timestep draws' random "
            f"numbers and noise with seed k of `{baseline}`. **Headline: the baseline-equivalent speed-up at the "
            f"budget**, the paper's reading of \"2x\": per seed, the iterations `{baseline}`'s seed k needs to "
            f"reach the method's seed-k {metric} at the {budget}-iteration budget, divided by {budget} (read on "
            f"the baseline's curve, interpolated in log-iterations). {ext}{same_run if extend > 1 else ''}. "
            f"Geometric mean over {n} paired seeds with {how}, {conf:g}%, in brackets. Bounds get no interval: "
            f"'>= x', some seeds were better than the baseline's whole curve; '<= x', some ended no better than "
            f"the baseline's first evaluation. 'final - baseline' is the paired difference of the {metric} at the "
            f"budget ({better} is better), mean [t-interval]."]
    if family:
        text += [f"**Holm-adjusted** columns correct for the {len(family)} method{'s' * (len(family) != 1)} tested against `{baseline}` "
                 f"(controls are outside that family): each is the t-interval at the level Holm's step-down gives it "
                 f"(between {conf:g}% and {100 - (100 - conf) / len(family):.3g}%), with the adjusted p-value; an "
                 "adjusted interval excludes 1 (or 0) exactly when Holm rejects, so the claims it separates from "
                 f"the null hold together at a family-wise error of at most {100 - conf:g}%. Read claims from these; "
                 "their ends are not simultaneous bounds on every method's size (Bonferroni's level, "
                 f"{100 - (100 - conf) / len(family):.3g}% for all, would give those)."]
    if controls:
        text += [f"Controls: {', '.join(f'`{c}`' for c in controls)}"
                 + (" (the baseline with its timestep and noise streams re-seeded: same initialisation and data, so "
                    "every difference is noise; its intervals should cover 1 and 0)" if PLACEBO in controls else "")
                 + "."]
    if early:
        shown = ", ".join(f"{100 * f:g}%" for f in early)
        text += [f"Secondary, the **early-training rate**: each seed's own baseline value at a fraction f of the "
                 f"budget ({shown}) is the target F*(f); speed-up = iterations the baseline seed needs / "
                 f"iterations the method's seed needs to reach it (unadjusted intervals). It measures how fast "
                 f"training starts, not the quality at the budget. Per-seed values are in tables/speedup.csv."]
    return [line for t in text for line in (t, "")]


# ----------------------------------------------------------------------------------------------
# The verdicts, at the top of the report.


def ruled(ctx, evals: pd.DataFrame) -> pd.DataFrame:
    """The evaluations with the baseline's curves under the suite's [report] baseline_curve rule."""
    return apply_rule(evals, ctx.baseline, settings(ctx.info)["baseline_curve"])


def workload_verdicts(ctx, w: str, w_evals: pd.DataFrame, rows: list[dict], labels: list[str], budget: float,
                      metric: str, extend: float) -> list[str]:
    """For the headline metric: keep the workload's verdicts for the top of the report and return the
    section of its method comparisons ([report] compare)."""
    if metric != ctx.primary:
        return []
    runs = [r for r in ctx.runs if r["workload"] == w]
    a = assess(w, w_evals, rows, ctx.baseline, labels, budget, metric, extend, ctx.stats_kw, ctx.info, runs)
    a.compare = compare_rows(apply_rule(w_evals, ctx.baseline, a.rule), settings(ctx.info)["compare"], rows,
                             budget, metric, ctx.stats_kw)
    ctx.parts.setdefault("verdicts", []).append(a)
    note = (["The speed-ups above read each baseline seed's monotone fit ([report] baseline_curve = \"monotone\"; "
             "raw curves are the sensitivity column of the verdicts).", ""] if a.rule == "monotone" else [])
    return note + compare_lines(a.compare, metric, ctx.stats_kw["confidence"])


def verdict_section(ctx) -> list[str]:
    """The verdict paragraph of every workload with its table; writes tables/verdicts.{csv,md} and
    tables/compare.{csv,md}."""
    found = ctx.parts.get("verdicts") or []
    if not found:
        return []
    a0, conf = found[0], ctx.stats_kw["confidence"]
    sets = max(a.n_sets for a in found)
    lines = ["## Verdicts", "",
             f"On the headline, the baseline-equivalent speed-up at the budget ({a0.metric}), Holm-adjusted across "
             f"the methods of each workload (family-wise error {100 * (1 - conf):g}%); where a speed-up is a bound, "
             f"the Holm-adjusted final difference decides. The baseline's curve is read **{a0.rule}** (the rule "
             f"fixed in advance, [report] baseline_curve); \"{OTHER_RULE[a0.rule]}\" is the sensitivity column. "
             "**Fragile**: the verdict changes under the other rule"
             + (f" or with one of the {sets} noise sets alone instead of their mean" if sets > 1 else "")
             + ". Beside each \"not separated\": the smallest effect a test finds with 80% power at Holm's "
             "strictest level (alpha / m, what a method separated alone needs).", ""]
    facts = pd.concat(ctx.parts.get("facts") or [pd.DataFrame()], ignore_index=True)
    table, comp = [], []
    for a in found:
        flags = _clip_flags(facts, a.workload, a.baseline)
        lines += _workload_verdict_lines(a, flags, [r for r in ctx.runs if r["workload"] == a.workload], ctx.evals)
        table += [{**t, "flags": flags.get(t["method"], "")} for t in a.table]
        comp += [compare_frame(a.compare, a.workload, a.metric)] if a.compare else []
    shown = pd.DataFrame(table)
    lines += [to_markdown(shown.drop(columns=["metric"])) if not shown.empty else "", "",
              "Tables: [tables/verdicts.csv](tables/verdicts.csv)" + (", [tables/compare.csv](tables/compare.csv)"
                                                                     if comp else "") + ".", ""]
    tab = ctx.out / "tables"
    atomic_write_bytes(tab / "verdicts.csv", shown.to_csv(index=False).encode())
    atomic_write_bytes(tab / "verdicts.md", (to_markdown(shown) + "\n").encode())
    if comp:
        frame = pd.concat(comp, ignore_index=True)
        atomic_write_bytes(tab / "compare.csv", frame.to_csv(index=False).encode())
        atomic_write_bytes(tab / "compare.md", (to_markdown(frame) + "\n").encode())
    return lines


def _workload_verdict_lines(a, flags: dict, runs: list[dict], evals: pd.DataFrame) -> list[str]:
    out = [f"**{a.workload}** ({a.family} method{'s' * (a.family != 1)} against `{a.baseline}`, budget "
           f"{a.budget:g} iterations, the baseline to {a.extend:g}x):", ""]
    for key in (FASTER, SLOWER, NULL, NO_TEST, "saturated", "fragile"):
        if a.lines.get(key):
            out.append(f"- **{key}**: " + "; ".join(a.lines[key]))
    if flags:
        out.append(f"- **clipped** (more than {CLIP_RATIO_MAX:g}x the baseline's share of clipped steps: a "
                   "confound): " + "; ".join(f"{k} {v}" for k, v in flags.items()))
    if a.compare:
        out.append(f"- **compared** (Holm over the {len(a.compare)} comparison{'s' * (len(a.compare) != 1)}, their "
                   "own family): "
                   + "; ".join(f"{r['method_label']}: {r['verdict']}" for r in a.compare))
    if a.lines.get("control"):
        out.append("- **control**: " + "; ".join(a.lines["control"]))
    out += repa_lines(runs, evals, a.metric)
    return out + [""]


def _clip_flags(facts: pd.DataFrame, w: str, baseline: str) -> dict[str, str]:
    """Methods whose share of clipped steps is more than CLIP_RATIO_MAX x the baseline's."""
    if facts.empty or "workload" not in facts:
        return {}
    f = facts[facts.workload == w].set_index("method")
    if baseline not in f.index:
        return {}
    base = float(f.loc[baseline, "clipped_fraction"])
    return {m: f"clipped on {100 * c:.1f}% of steps (baseline {100 * base:.1f}%)"
            for m, c in f.clipped_fraction.items() if m != baseline and c > CLIP_RATIO_MAX * base and c > 0}


def repa_lines(runs: list[dict], evals: pd.DataFrame, metric: str) -> list[str]:
    """REPA's teacher, named from the run's record (method_trace.json "aux" -> "teacher", written by
    methods/repa.py; else config.json's hyperparameters), and flagged when it is the network that
    defines the metric: the same weights' SHA-256 or name as the metric's rows, or role "metric"."""
    g = evals[evals.metric == metric] if not evals.empty else evals
    net = {str(v) for c in ("feature_extractor", "weights_sha256") if c in g for v in g[c].dropna().unique()}
    out = {}
    for r in sorted(runs, key=lambda r: r.get("seed", 0)):
        cfg = r.get("config") or {}
        params = cfg.get("method_resolved_params") or {}
        if r["label"] in out or (cfg.get("method") != "repa" and not any(str(k).startswith("repa.") for k in params)):
            continue
        trace = (read_json_or_none(r["dir"] / "method_trace.json") or {}) if r.get("dir") else {}
        rec = (trace.get("aux") or {}).get("teacher") or {
            k: v for k, v in {**params, **cfg}.items() if "teacher" in str(k) and v not in (None, "")}
        if rec:
            shown = ", ".join(f"{k} = {v}" for k, v in rec.items())
            same = "metric" in (rec.get("role"), rec.get("teacher")) or any(str(v) in net for v in rec.values())
        else:
            shown = "not recorded (a run from before the teacher was): the dataset's proxy classifier"
            same = metric.startswith("proxy_")
        out[r["label"]] = shown + (f": **teacher = metric network** (it also defines {metric}, so REPA trains "
                                   "toward the metric's own features)" if same else
                                   f"; not the network of the metric ({metric})")
    return [f"- **REPA's teacher** ({label}): {text}" for label, text in sorted(out.items())]
