"""`run_bench.py consistency TARGET...`: do trained models map the same noise to the same image?

Targets are run folders, or a suite (its name under the results root, or its results folder) with
selectors: `--method baseline` (all seeds of one method), `--seed 0` (one seed of every method),
`--arch`, `--dataset`. Each model is its run's EMA network at the run's last checkpoint. The command
1. samples every model from the same fixed noise (the first model's evaluation sampler and noise
   seed, images 0..N-1: the noise of image i depends on i alone, bench/eval/sampling.py);
2. feeds every model the same x_t, built from real images and one fixed noise each, at timesteps
   spread over 0..T-1, and compares their x0 predictions;
3. reads the evaluation samples the runs saved (`[eval] save_samples = true`) at every step they
   share, for agreement over training;
and writes tables/, figures/, samples.npz, consistency.json and report.md into
<suite results>/consistency/<name>/ (or --out). The measures and their reference levels are
bench/report/consistency.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.core.config import TrainConfig
from bench.core.diffusion import Schedule, make_schedule
from bench.core.runtime import resolve_device
from bench.data.loading import dataset_info, load_dataset
from bench.errors import ConfigError
from bench.eval.fid import select_subset
from bench.eval.inception import get_inception
from bench.eval.proxy import get_proxy
from bench.eval.sampling import check_sampler_args, sample, to_uint8
from bench.fileio import atomic_write, atomic_write_bytes, check_output_folder, pid_running, write_json
from bench.models.networks import build_model
from bench.report.consistency import pair_row, prediction_row, write_report
from bench.report.samples import saved_samples
from bench.train.checkpoint import load_checkpoint
from bench.train.resolve import resolve_run


@dataclass
class Model:
    """One run's EMA network, ready to sample."""

    run: Path
    cfg: TrainConfig
    spec: dict  # the run's evaluation spec (sampler, noise seed, metrics)
    step: int
    net: torch.nn.Module
    num_classes: int
    label: str = ""


# --------------------------------------------------------------------------- selecting and loading


def select_runs(targets: list[str], results_root: Path, *, methods=(), seeds=(), archs=(), datasets=()) -> list[Path]:
    """The run folders the targets name, filtered by the selectors, in a stable order."""
    runs = []
    for target in targets:
        path = Path(target)
        if not path.exists() and (results_root / target).exists():
            path = results_root / target
        if (path / "config.json").is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p.parent for p in path.rglob("config.json") if "consistency" not in p.parts)
        else:
            raise ConfigError(f"consistency: {target!r} is neither a run folder nor a suite's results (looked in "
                              f"{results_root}); run `python run_bench.py run SUITE` first")
    picked = []
    for run in dict.fromkeys(runs):
        c = _record(run)
        if ((not methods or c["method"] in methods or c.get("method_label") in methods)
                and (not seeds or c["seed"] in seeds) and (not archs or c["arch"] in archs)
                and (not datasets or c["dataset"] in datasets)):
            picked.append(run)
    if len(picked) < 2:
        raise ConfigError(f"consistency needs at least 2 runs, the selection has {len(picked)}; name more run "
                          "folders or loosen --method/--seed/--arch/--dataset")
    return picked


def _record(run: Path) -> dict:
    try:
        return json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"consistency: {run}/config.json is unreadable; that folder is not a finished run") from None


def load_model(run: Path, device: torch.device) -> Model:
    """The run's EMA network at its last checkpoint, in eval mode on `device`."""
    fields = set(TrainConfig.__dataclass_fields__)
    resolved = resolve_run({k: v for k, v in _record(run).items() if k in fields}, where=f"{run}/config.json")
    cfg = resolved.config
    path = run / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"consistency: {run} has no checkpoint.pt (the run has not trained a step yet); run it first")
    ckpt = load_checkpoint(path)
    resolution = cfg.resolution or dataset_info(cfg.dataset).RESOLUTION
    num_classes = 0
    if cfg.class_cond:
        num_classes = int(load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.resolution)[1].max()) + 1
    net = build_model(cfg.arch, dataset_info(cfg.dataset).CHANNELS, resolution,
                      **({"num_classes": num_classes} if num_classes else {}))
    net.load_state_dict(ckpt["ema"])
    spec = resolved.eval_spec or {}
    return Model(run, cfg, spec, int(ckpt["step"]), net.to(device).eval(), num_classes)


def label_models(models: list[Model]) -> None:
    """method/seedK, with the architecture and workload where the models differ in them."""
    archs = {m.cfg.arch for m in models}
    data = {(m.cfg.dataset, m.cfg.resolution) for m in models}
    for m in models:
        parts = [_record(m.run).get("method_label") or m.cfg.method, f"seed{m.cfg.seed}"]
        if len(archs) > 1:
            parts.insert(0, m.cfg.arch)
        if len(data) > 1:
            parts.insert(0, f"{m.cfg.dataset}-{m.cfg.resolution}")
        m.label = "/".join(parts)
    seen: dict[str, int] = {}
    for m in models:  # two folders of one method and seed (e.g. copies): number them
        seen[m.label] = seen.get(m.label, 0) + 1
        if seen[m.label] > 1:
            m.label += f"#{seen[m.label]}"


def common_setting(models: list[Model]) -> tuple[Schedule, str, tuple]:
    """The schedule and image shape every model shares (one ConfigError line when they do not)."""
    def key(m: Model):
        return (m.cfg.schedule, m.cfg.T, m.cfg.zero_terminal_snr, m.cfg.dataset, m.cfg.resolution)

    first = models[0]
    for m in models[1:]:
        if key(m) != key(first):
            raise ConfigError(f"consistency: {m.run} and {first.run} differ in schedule or data {key(m)} vs "
                              f"{key(first)}; compare models of one workload (select with --dataset)")
    resolution = first.cfg.resolution or dataset_info(first.cfg.dataset).RESOLUTION
    shape = (dataset_info(first.cfg.dataset).CHANNELS, resolution, resolution)
    return make_schedule(first.cfg.schedule, first.cfg.T, first.cfg.zero_terminal_snr), first.cfg.dataset, shape


# --------------------------------------------------------------------------- the three measurements


def sampling_settings(spec: dict, T: int) -> dict:
    """The sampler every model uses: the first model's evaluation sampler (DDIM 50 when it has none)."""
    sampler = spec.get("sampler", "ddim")
    steps = check_sampler_args(sampler, spec.get("sampler_steps"), spec.get("eta", 0.0), T,
                               spec.get("ddpm_variance", "large"), spec.get("timestep_spacing", "trailing"))
    return {"sampler": sampler, "steps": steps, "eta": float(spec.get("eta", 0.0)),
            "spacing": spec.get("timestep_spacing", "trailing"), "ddpm_variance": spec.get("ddpm_variance", "large"),
            "noise_seed": int(spec.get("noise_seed", 0)), "clip_x0": bool(spec.get("clip_x0", True))}


def same_noise_samples(models: list[Model], schedule: Schedule, shape: tuple, n: int, s: dict,
                       batch_size: int = 250) -> dict[str, torch.Tensor]:
    """uint8 [n, C, H, W] per model, images 0..n-1 of the fixed noise s['noise_seed']."""
    out = {}
    for m in models:
        x = sample(m.net, schedule, m.cfg.target, n, shape, batch_size=batch_size, sampler=s["sampler"],
                   steps=s["steps"], eta=s["eta"], noise_seed=s["noise_seed"], clip_x0=s["clip_x0"],
                   spacing=s["spacing"], ddpm_variance=s["ddpm_variance"], num_classes=m.num_classes)
        out[m.label] = to_uint8(x)
    return out


def feature_extractor(spec: dict, device: torch.device):
    """The extractor of the evaluation's metric (the proxy network, or Inception for FID), or None."""
    metrics = set(spec.get("metrics", ()))
    if metrics & {"proxy_fd", "proxy_kid"}:
        return get_proxy(spec["dataset"], spec["resolution"], data_dir=spec.get("data_dir"),
                         cache_dir=spec.get("cache_dir"), seed=spec.get("proxy_seed", 0)).to(device)
    if metrics & {"fid", "kid"}:
        return get_inception(spec.get("inception"), device, mode=spec.get("fid_mode", "clean"))
    return None


def pairs_table(images: dict[str, torch.Tensor], ext, labels: list[str]) -> pd.DataFrame:
    """Every ordered pair of models (a model with itself included): the measures of
    bench.report.consistency.pair_row."""
    flat = {k: v.reshape(len(v), -1).double().numpy() / 255.0 for k, v in images.items()}
    feats = {k: np.asarray(ext.features(v), dtype=np.float64) for k, v in images.items()} if ext is not None else {}
    rows = []
    for i, a in enumerate(labels):
        for b in labels[i:]:
            r = pair_row(flat[a], flat[b], feats.get(a), feats.get(b))
            rows += [{"model_a": a, "model_b": b, **r}, *([{"model_a": b, "model_b": a, **r}] if a != b else [])]
    return pd.DataFrame(rows)


@torch.inference_mode()
def predictions_over_t(models: list[Model], schedule: Schedule, x0_uint8: torch.Tensor, t_values: list[int],
                       noise_seed: int, clip_x0: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs over t, each model's RMSE to the truth over t) for the predictions of every model from
    the same x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, one fixed eps per image. x0 is taken as the
    sampler uses it (clamped to [-1, 1] with clip_x0), in pixels in [0, 1]; eps as predicted."""
    g = torch.Generator().manual_seed(noise_seed + 7919)  # a noise of its own, not the sampling noise
    x0 = x0_uint8.float() / 127.5 - 1.0
    eps = torch.randn(x0.shape, generator=g)
    truth, eps_truth = ((x0 + 1) / 2).flatten(1).double().numpy(), eps.flatten(1).double().numpy()
    pairs, errors = [], []
    for t in t_values:
        tt = torch.full((len(x0),), t, dtype=torch.long)
        x_t = schedule.sqrt_ab(tt, x0) * x0 + schedule.sqrt_1mab(tt, x0) * eps
        pred = {}
        for m in models:
            dev = next(m.net.parameters()).device
            labels = [torch.arange(len(x0), device=dev) % m.num_classes] if m.num_classes else []
            out = m.net(x_t.to(dev), tt.to(dev), *labels).float().cpu()
            x0_hat, eps_hat = schedule.predict_x0_eps(m.cfg.target, x_t, tt, out)
            x0_hat = x0_hat.clamp(-1, 1) if clip_x0 else x0_hat
            pred[m.label] = (((x0_hat.double() + 1) / 2).flatten(1).numpy(), eps_hat.double().flatten(1).numpy())
            errors.append({"t": t, "model": m.label, "rmse_truth": float(np.sqrt(((pred[m.label][0] - truth) ** 2).mean())),
                           "eps_rmse_truth": float(np.sqrt(((pred[m.label][1] - eps_truth) ** 2).mean()))})
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                (xa, ea), (xb, eb) = pred[a.label], pred[b.label]
                pairs.append({"t": t, "model_a": a.label, "model_b": b.label, **prediction_row(xa, xb, ea, eb, eps_truth)})
    return pd.DataFrame(pairs), pd.DataFrame(errors)


def initial_network(m: Model) -> Model:
    """The network the run started from, rebuilt as training's setup builds it: the run's seed, then
    the architecture's initialisation (bench.train.loop.setup; a test holds the two together)."""
    resolution = m.cfg.resolution or dataset_info(m.cfg.dataset).RESOLUTION
    torch.manual_seed(m.cfg.seed)
    net = build_model(m.cfg.arch, dataset_info(m.cfg.dataset).CHANNELS, resolution,
                      **({"num_classes": m.num_classes} if m.num_classes else {}))
    return dataclasses.replace(m, net=net.to(next(m.net.parameters()).device).eval(), step=0)


def over_training(models: list[Model], ext, initial: dict[str, torch.Tensor]) -> tuple[pd.DataFrame, int, str]:
    """Pairs of models at step 0 (their initial networks' samples, `initial`: what the shared noise
    gives before any training) and at every evaluation step whose samples every run saved: (table,
    images per model, a note on what is missing)."""
    labels = [m.label for m in models]
    seeds = {json.dumps(sampling_settings(m.spec, m.cfg.T), sort_keys=True) for m in models}  # noise and sampler
    steps = [saved_samples(m.run) for m in models]
    missing = [m.label for m, s in zip(models, steps) if not s]
    note = ""
    if missing:
        steps, note = [{} for _ in models], (f"Not measured after step 0: {', '.join(missing)} saved no evaluation "
                                             "samples; set `save_samples = true` in the suite's [eval] table and run it again.")
    elif len(seeds) > 1:
        steps, note = [{} for _ in models], "Not measured after step 0: the runs' evaluations used different noise or samplers."
    common = sorted(set.intersection(*(set(s) for s in steps)))
    every = sorted(set().union(*(set(s) for s in steps)))
    rows, n = [], min(len(v) for v in initial.values())
    for step in common:
        images = {}
        for m, s in zip(models, steps):
            with np.load(s[step]) as z:
                images[m.label] = torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous()
        n = min(n, *(len(v) for v in images.values()))
        rows.append((step, images))
    table = [pairs_table({k: v[:n] for k, v in images.items()}, ext, labels).assign(step=step)
             for step, images in [(0, initial), *rows]]
    if common != every:
        note = (f"Steps saved by some runs only (not compared): "
                f"{', '.join(map(str, sorted(set(every) - set(common))))}.")
    return pd.concat(table, ignore_index=True), n, note


# --------------------------------------------------------------------------- the command


def run_consistency(runs: list[Path], out: Path, *, name: str, num_images: int | None = None, x0_images: int = 256,
                    t_points: int = 20, grid_columns: int = 8, device: str = "auto", command: str = "",
                    root: Path | None = None) -> Path:
    """Measure the runs' consistency and write everything into `out`; returns report.md's path. Run
    folders under `root` (the results root) are recorded relative to it."""
    check_output_folder(out, "--out")  # before the measurements, which take a while
    dev = resolve_device(device)
    models = [load_model(r, dev) for r in runs]
    label_models(models)
    labels = [m.label for m in models]
    schedule, dataset, shape = common_setting(models)
    first = models[0]
    s = sampling_settings(first.spec, schedule.T)
    n = int(num_images or first.spec.get("num_images") or 256)
    if n < 2 or x0_images < 2 or t_points < 2 or grid_columns < 1:
        raise ConfigError("consistency: --num-images and --x0-images need at least 2, --t-points at least 2, "
                          "--grid-columns at least 1")
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    say(f"consistency: {len(models)} models, {n} images each from noise seed {s['noise_seed']}")
    images = same_noise_samples(models, schedule, shape, n, s, batch_size=int(first.spec.get("batch_size") or 250))
    ext = feature_extractor(first.spec, dev)
    pairs = pairs_table(images, ext, labels)

    # The networks' x0 predictions for the same x_t, from real images of the evaluation's split.
    split = first.spec.get("ref_split", "test")
    real, _ = load_dataset(dataset, split, first.cfg.data_dir, first.cfg.resolution)
    pick = select_subset(len(real), min(x0_images, len(real)), 2)
    real = real if pick is None else real[pick]
    t_values = sorted({int(round(v)) for v in np.linspace(0, schedule.T - 1, t_points)})
    say(f"consistency: x0 predictions of {len(real)} {split} images at {len(t_values)} timesteps")
    over_t, errors = predictions_over_t(models, schedule, real, t_values, s["noise_seed"], s["clip_x0"])
    say("consistency: the initial networks, and the runs' saved evaluation samples over training")
    initial = same_noise_samples([initial_network(m) for m in models], schedule, shape, n, s)
    training, training_n, note = over_training(models, ext, initial)

    # Write: tables, the grid's images, what was measured, then the report from those files alone; all of it
    # into a staging folder first, moved into place when whole (a killed command leaves no half of it).
    staging = staging_folder(out)
    try:
        tab = staging / "tables"
        tab.mkdir()
        frames = {"pairs": pairs, "over_t": over_t, "errors_over_t": errors, "over_training": training}
        for stem, frame in frames.items():
            if not frame.empty:
                atomic_write_bytes(tab / f"{stem}.csv", frame.to_csv(index=False).encode())
        cols = min(grid_columns, n)
        grid = np.stack([images[k][:cols].permute(0, 2, 3, 1).numpy() for k in labels])
        atomic_write(staging / "samples.npz", lambda f: np.savez(f, images=grid, labels=np.array(labels)))
        write_json(staging / "consistency.json", {
            "name": name, "workload": f"{dataset} {shape[-1]} px", "T": schedule.T, "command": command,
            "models": [{"label": m.label, "run": _shown(m.run, root), "step": m.step, "method": m.cfg.method, "seed": m.cfg.seed,
                        "arch": m.cfg.arch} for m in models],
            "sampling": s, "num_images": n, "features": getattr(ext, "name", None), "x0_images": len(real),
            "x0_split": split, "t_values": t_values, "grid_columns": cols, "over_training_images": training_n,
            "over_training_note": note})
        write_report(staging)
    except BaseException:  # an error (a kill leaves it to the next command's sweep)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    move_into_place(staging, out, gone=[f"tables/{stem}.csv" for stem, frame in frames.items() if frame.empty])
    return out / "report.md"


def staging_folder(out: Path) -> Path:
    """A fresh folder beside `out` for this process to build into (two commands never share one); the
    staging folders of killed commands are removed first."""
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if not (pid.isdigit() and pid_running(int(pid))) or int(pid) == os.getpid():
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    staging.mkdir(parents=True)
    return staging


def move_into_place(staging: Path, out: Path, gone: list[str]) -> None:
    """A new output folder is renamed into place whole; an existing one gets each file by a rename,
    report.md last (it is what a reader opens), and loses the files this build no longer makes."""
    if not out.exists():
        os.replace(staging, out)
        return
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == "report.md", str(p)))
    for f in files:
        (out / f.relative_to(staging)).parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, out / f.relative_to(staging))  # renames: no space needed, no half file seen
    for rel in gone:
        (out / rel).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def default_name(methods, seeds, archs, datasets) -> str:
    parts = [f"{k}-{'+'.join(map(str, v))}" for k, v in
             (("method", methods), ("seed", seeds), ("arch", archs), ("dataset", datasets)) if v]
    return "_".join(parts) or "all"


def cmd_consistency(args: argparse.Namespace) -> None:
    root = Path(args.results)
    runs = select_runs(args.targets, root, methods=args.method, seeds=args.seed, archs=args.arch, datasets=args.dataset)
    name = args.name or default_name(args.method, args.seed, args.arch, args.dataset)
    if args.out:
        out = Path(args.out)
    else:
        suite_dir = _suite_dir(args.targets[0], root)
        out = (suite_dir if suite_dir is not None else root) / "consistency" / name
    command = shlex.join(["python", "run_bench.py", "consistency", *args.targets,
                          *(f"--{k.replace('_', '-')}={v}" for k in ("method", "seed", "arch", "dataset")
                            for v in getattr(args, k)),
                          *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("name", "out", "num_images")
                            if getattr(args, k) is not None)])
    print(run_consistency(runs, out, name=name, num_images=args.num_images, x0_images=args.x0_images,
                          t_points=args.t_points, grid_columns=args.grid_columns, device=args.device, command=command,
                          root=root))


def _suite_dir(target: str, root: Path) -> Path | None:
    """The suite results folder a target names (None for a run folder)."""
    path = Path(target) if Path(target).exists() else root / target
    return None if (path / "config.json").is_file() else path


def _shown(run: Path, root: Path | None) -> str:
    """A run folder as the report names it: relative to the results root when it lies under it."""
    try:
        return str(run.resolve().relative_to(root.resolve())) if root is not None else str(run)
    except ValueError:
        return str(run)
