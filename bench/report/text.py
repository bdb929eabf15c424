"""The report's header text: what every number is (metric, feature extractor and its hash, N,
reference, sampler and its timesteps), the training settings of each workload, and the machines
the runs ran on. Files only, no torch.
"""

from __future__ import annotations

import math
import os
import platform

import pandas as pd

from bench.report.speedup import lower_is_better


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

def training_lines(runs: list[dict]) -> list[str]:
    lines = []
    by_workload: dict[str, dict] = {}
    extended: dict[str, dict] = {}
    for r in runs:
        if r["config"]:
            cfg = r["config"]
            if cfg.get("budget_iters") and cfg["budget_iters"] < cfg.get("iters", 0):
                extended.setdefault(r["workload"], {**cfg, "label": r["label"]})
            else:
                by_workload.setdefault(r["workload"], cfg)
    for w, ext in extended.items():
        by_workload.setdefault(w, {**ext, "iters": ext["budget_iters"]})  # only the extended baseline ran
    for w, cfg in sorted(by_workload.items()):
        images = (cfg.get("iters") or 0) * (cfg.get("batch_size") or 0)
        settings = ", ".join(f"{k} {cfg[k]}" for k in COMMON_KEYS if k in cfg)
        ext = extended.get(w)
        more = (f"; the baseline `{ext['label']}` trains on to {ext['iters']} iterations "
                f"({ext['iters'] / ext['budget_iters']:g}x the budget, the same evaluation grid continued)"
                if ext else "")
        lines.append(f"- **{w}**: dataset {cfg.get('dataset')} at resolution {cfg.get('resolution') or 'native'}, "
                     f"architecture {cfg.get('arch')}; budget {cfg.get('iters')} iterations x batch "
                     f"{cfg.get('batch_size')} = {images:,} images for every method{more}; {settings}")
    return lines
