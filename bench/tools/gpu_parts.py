"""The GPU check's parts (bench.tools.gpu_check runs each in its own process, so that each can be cut
at its time guard and leaves nothing behind on the GPU):

    python -m bench.tools.gpu_parts PART ARGS.json OUT.json

PART is one of :data:`PARTS`; ARGS.json its keyword arguments; OUT.json receives its result dict.
``imagenet_rank`` is what each torchrun process of ``imagenet_run`` executes.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.core.config import TrainConfig
from bench.core.perf import tune_allocator
from bench.train.loop import settle, setup, step, train, train_step
from bench.train.resolve import resolve_run

REPO = Path(__file__).resolve().parents[2]

SIZES = {  # full check / --quick
    "batch": (128, 4), "warmup": (10, 1), "steps": (30, 2), "train_images": (10_000, 64), "test_images": (2_000, 16),
    "paper_iters": (100, 3), "fid_images": (2_000, 8), "sampler_steps": (100, 2),
    "imagenet_images": (256, 16), "imagenet_iters": (10, 2),
    "imagenet_eval_images": (200, 6),
}


def size(name: str, quick: bool) -> int:
    return SIZES[name][1 if quick else 0]


def write_cifar_like(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Smooth random colour images in cifar-10-batches-py's format (5 train batches, 1 test batch)."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def images(n):
        low = rng.uniform(0, 255, (n, 3, 4, 4))
        up = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)  # blocky 32x32, then noise
        return np.clip(up + rng.normal(0, 20, up.shape), 0, 255).astype(np.uint8).reshape(n, 3072)

    per = max(1, n_train // 5)
    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": images(per), "labels": rng.integers(0, 10, per).tolist()}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": images(n_test), "labels": rng.integers(0, 10, n_test).tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def write_ilsvrc_like(root: Path, n: int, classes: int = 4, seed: int = 0) -> Path:
    """n JPEGs of 160 x 144 px in ILSVRC's train layout (nXXXXXXXX/<wnid>_<k>.JPEG), `classes` classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(n):
        wnid = f"n{1440764 + k % classes:08d}"
        (root / wnid).mkdir(parents=True, exist_ok=True)
        low = rng.uniform(0, 255, (9, 10, 3))
        img = np.clip(np.repeat(np.repeat(low, 16, 0), 16, 1) + rng.normal(0, 20, (144, 160, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(root / wnid / f"{wnid}_{k}.JPEG", quality=90)
    return root


def run_bounded(cmd: list[str], timeout_s: float, **kw) -> tuple[int | None, str, str]:
    """(return code, stdout, stderr) of a command; None when it ran past `timeout_s`, and then the
    whole process group (torchrun's workers included) is killed, leaving no process on the GPU."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kw)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout_s))
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def error_line(text: str) -> str:
    """The most telling line of a failed command's output: its `error:` line or the exception."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # torchrun's own ChildFailedError says only that a child failed: the child's line says why
    for pick in (lambda x: x.startswith("error:"), lambda x: "Error" in x.split(":")[0] and "ChildFailed" not in x,
                 lambda x: "Error: " in x and "ChildFailed" not in x):
        found = [line for line in lines if pick(line)]
        if found:
            return found[-1][:300]
    return (lines[-1] if lines else "(no output)")[:300]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(arch: str, settings: dict, data_dir: str, device: str, quick: bool) -> dict:
    """Training images/s of `arch` at the check's batch with `settings`, peak memory, data time."""
    import torch

    batch = size("batch", quick)
    cfg = TrainConfig(dataset="cifar10", data_dir=data_dir, arch=arch, batch_size=batch, iters=1_000_000,
                      warmup=0, lr=2e-4, flip=True, device=device, **settings)
    out = {"arch": arch, "batch": batch, **settings}
    cuda = device.startswith("cuda")
    try:
        run = resolve_run(cfg)
        state = setup(run.config, run.method)
        out["params_m"] = round(sum(p.numel() for p in state.model.parameters()) / 1e6, 2)
        start = time.perf_counter()
        for _ in range(size("warmup", quick)):  # warm-up (and compilation)
            train_step(state)
        _sync(device)
        out["warmup_s"] = round(time.perf_counter() - start, 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        steps = size("steps", quick)
        start = time.perf_counter()
        rows = settle(state, [step(state) for _ in range(steps)], start)  # launched as the loop does, read once
        elapsed = time.perf_counter() - start
        data_s = sum(r["data_seconds"] for r in rows)
        out.update(images_per_s=round(batch * steps / elapsed, 1), step_ms=round(1000 * elapsed / steps, 2),
                   data_ms=round(1000 * data_s / steps, 3), data_fraction=round(data_s / elapsed, 4),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                   final_loss=rows[-1]["loss"])
    except torch.cuda.OutOfMemoryError:
        out["error"] = "out of memory"
    return out


def paper_run(data_dir: str, device: str, quick: bool, work: str) -> dict:
    """A paper-cifar10-shaped run: ddpm-unet (--quick: unet-tiny), the suite's recipe, one FID evaluation at the end."""
    iters, n, work = size("paper_iters", quick), size("fid_images", quick), Path(work)
    cfg = TrainConfig(dataset="cifar10", data_dir=data_dir, arch="unet-tiny" if quick else "ddpm-unet", flip=True, iters=iters,
                      batch_size=size("batch", quick), lr=2e-4, warmup=min(5000, iters), grad_clip=1.0,
                      ema_decay=0.9999, ckpt_every=iters, eval_every=iters, device=device,
                      eval={"metrics": ["fid"], "num_images": n, "num_ref": n, "ref_split": "train",
                            "sampler": "ddim", "sampler_steps": size("sampler_steps", quick),
                            "timestep_spacing": "linspace", "batch_size": 500 if not quick else n,
                            "cache_dir": str(work / "eval-cache")})
    start = time.perf_counter()
    status = train(cfg, work / "paper-run")
    wall = time.perf_counter() - start
    evals = [json.loads(line) for line in (work / "paper-run" / "evals.jsonl").read_text().splitlines()]
    runtime = json.loads((work / "paper-run" / "config.json").read_text())["runtime"][-1]
    return {"iters": iters, "batch": cfg.batch_size, "wall_s": round(wall, 1),
            "train_s": round(status["train_seconds"], 1), "eval_s": round(status["eval_seconds"], 1),
            "train_images_per_s": round(iters * cfg.batch_size / status["train_seconds"], 1),
            "fid": evals[-1]["value"] if evals else None, "fid_images": n,
            "sample_s": evals[-1].get("sample_seconds") if evals else None, "runtime": runtime}


def imagenet_config(prepared: str, device: str, quick: bool, work: str) -> dict:
    """The ImageNet path at check size: class-conditional adm-unet at 128 px (--quick: unet-tiny) on
    the memory-mapped prepared set, 2 processes, evaluated by both ranks."""
    iters = size("imagenet_iters", quick)
    return dict(dataset="imagenet128", data_dir=prepared, resolution=128,
                arch="unet-tiny" if quick else "adm-unet", class_cond=True, flip=True, iters=iters, batch_size=8,
                lr=1e-4, warmup=0, ema_decay=0.9999, ckpt_every=iters, eval_every=iters, gpus=2, device=device,
                eval={"metrics": ["fid"], "num_images": size("imagenet_eval_images", quick), "num_ref": "all",
                      "sampler": "ddim", "sampler_steps": 5 if quick else 20, "timestep_spacing": "linspace",
                      "batch_size": 100, "cache_dir": str(Path(work) / "eval-cache")})


def imagenet_rank(config: dict, out: str) -> dict:
    """One torchrun process of imagenet_run: train and evaluate; rank 0's result names the set's mapping."""
    from bench.core.runtime import finish_processes, is_main
    from bench.data.loading import is_memory_mapped, load_dataset

    status = train(TrainConfig(**config), out)
    images, _ = load_dataset(config["dataset"], "train", config["data_dir"], config["resolution"])
    finish_processes()
    return {"state": status["state"], "memory_mapped": bool(is_memory_mapped(images)), "rank0": is_main()}


def imagenet_run(device: str, quick: bool, work: str, timeout_s: float) -> dict:
    """Prepare an ILSVRC-shaped folder as a memory-mapped set, then the ImageNet path under torchrun
    with 2 processes (one GPU each where there are 2, else sharing one GPU through gloo, named)."""
    import torch

    from bench.data.prepare import prepare

    work = Path(work)
    t0 = time.perf_counter()
    src = write_ilsvrc_like(work / "ilsvrc", size("imagenet_images", quick))
    prepared = prepare("imagenet128", str(src), work / "prepared", 128, workers=4, progress=False)
    res = {"prepare_s": round(time.perf_counter() - t0, 1)}
    config = imagenet_config(str(prepared), device, quick, str(work))
    args, rank_out, run_dir = work / "imagenet-args.json", work / "imagenet-rank.json", work / "imagenet-run"
    args.write_text(json.dumps({"config": config, "out": str(run_dir)}))
    env = dict(os.environ)
    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        env["DIFFBENCH_DIST_BACKEND"] = "gloo"  # two processes on one GPU: NCCL refuses them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bench.tools.gpu_parts", "imagenet_rank", str(args), str(rank_out)]
    t1 = time.perf_counter()
    code, _, err = run_bounded(cmd, timeout_s, cwd=REPO, env=env)
    res.update(arch=config["arch"], resolution=config["resolution"], processes=2, returncode=code,
               wall_s=round(time.perf_counter() - t1, 1))
    if code != 0:
        res["error"] = f"cut after {timeout_s:.0f} s (its guard)" if code is None else error_line(err)
        return res
    status = json.loads((run_dir / "status.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    runtime = json.loads((run_dir / "config.json").read_text())["runtime"][-1]
    res.update(json.loads(rank_out.read_text()), backend=runtime["backend"], device=runtime["device"],
               train_s=round(status["train_seconds"], 1), eval_s=round(status["eval_seconds"], 1),
               fid=evals[-1]["value"] if evals else None, eval_images=config["eval"]["num_images"],
               sample_precision=evals[-1].get("sample_precision") if evals else None)
    return res


PARTS = {"throughput": throughput, "paper_run": paper_run, "imagenet_run": imagenet_run,
         "imagenet_rank": imagenet_rank}


def main(argv=None) -> int:
    part, args_path, out_path = (argv or sys.argv[1:])[:3]
    tune_allocator()
    result = PARTS[part](**json.loads(Path(args_path).read_text()))
    if part != "imagenet_rank" or result.get("rank0"):
        Path(out_path).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
