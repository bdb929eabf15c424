"""The GPU check's parts (bench.tools.gpu_check runs each in its own process, so that each can be cut
at its time guard, bench/tools/gpu_guard.py, and leaves nothing behind on the GPU; the measuring
parts are in bench/tools/gpu_rows.py):

    python -m bench.tools.gpu_parts PART ARGS.json OUT.json

PART is one of :data:`PARTS`; ARGS.json its keyword arguments; OUT.json receives its result dict.
``imagenet_rank`` and ``nccl_rank`` are what each torchrun process of ``imagenet_run`` and ``nccl`` executes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bench.core.config import TrainConfig
from bench.core.perf import tune_allocator
from bench.data.generated import write_ilsvrc_like
from bench.tools.gpu_guard import run_bounded
from bench.tools.gpu_rows import inception, nccl_rank, sampling, train_rows
from bench.train.loop import train

REPO = Path(__file__).resolve().parents[2]

SIZES = {  # full check / --quick
    "batch": (128, 4), "warmup": (10, 1), "steps": (30, 2), "train_images": (10_000, 64), "test_images": (2_000, 16),
    "paper_iters": (100, 3), "fid_images": (2_000, 8), "sampler_steps": (100, 2),
    "imagenet_images": (256, 16), "imagenet_iters": (10, 2),
    "imagenet_eval_images": (200, 6), "imagenet_sampler_steps": (20, 2),
}


def size(name: str, quick: bool) -> int:
    return SIZES[name][1 if quick else 0]


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
                      "sampler": "ddim", "sampler_steps": size("imagenet_sampler_steps", quick),
                      "timestep_spacing": "linspace", "sample_precision": "bf16", "batch_size": 100,
                      "cache_dir": str(Path(work) / "eval-cache")})


def imagenet_rank(config: dict, out: str) -> dict:
    """One torchrun process of imagenet_run: train and evaluate; rank 0's result names the set's mapping."""
    from bench.core.runtime import finish_processes, is_main
    from bench.data.loading import is_memory_mapped, load_dataset

    status = train(TrainConfig(**config), out)
    images, _ = load_dataset(config["dataset"], "train", config["data_dir"], config["resolution"])
    finish_processes()
    return {"state": status["state"], "memory_mapped": bool(is_memory_mapped(images)), "rank0": is_main()}


def prepare_imagenet(quick: bool, work: str) -> dict:
    """An ILSVRC-shaped folder prepared as the memory-mapped imagenet128 set (the ImageNet path's and
    adm-unet's rows' data)."""
    from bench.data.prepare import prepare

    t0 = time.perf_counter()
    src = write_ilsvrc_like(Path(work) / "ilsvrc", size("imagenet_images", quick))
    prepared = prepare("imagenet128", str(src), Path(work) / "prepared", 128, workers=4, progress=False)
    return {"prepared": str(prepared), "images": size("imagenet_images", quick),
            "prepare_s": round(time.perf_counter() - t0, 1)}


def imagenet_run(device: str, quick: bool, work: str, prepared: str, timeout_s: float) -> dict:
    """The ImageNet path on the prepared set under torchrun with 2 processes (one GPU each where there
    are 2, and so NCCL; else sharing one GPU through gloo, named)."""
    import torch

    work, res = Path(work), {}
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


def nccl(device: str, quick: bool, work: str, timeout_s: float) -> dict:
    """The NCCL slice, with 2 or more GPUs only: an all-reduce of adm-unet's gradients (fp32) by one
    process per GPU (at most 8) under torchrun."""
    import torch

    if not device.startswith("cuda"):
        return {"skipped": "no GPU in use"}
    gpus = min(8, torch.cuda.device_count())
    if gpus < 2:
        return {"skipped": "one GPU"}
    numel = 2**20 if quick else 421_500_000  # adm-unet's parameters
    args, out = Path(work) / "nccl-args.json", Path(work) / "nccl-rank.json"
    args.write_text(json.dumps({"numel": numel, "out": str(out)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
           "bench.tools.gpu_parts", "nccl_rank", str(args), str(out)]
    code, _, err = run_bounded(cmd, timeout_s, cwd=REPO)
    if code != 0:
        return {"error": f"cut after {timeout_s:.0f} s (its guard)" if code is None else error_line(err)}
    return json.loads(out.read_text())


PARTS = {"train_rows": train_rows, "sampling": sampling, "inception": inception, "prepare_imagenet": prepare_imagenet,
         "paper_run": paper_run, "imagenet_run": imagenet_run, "imagenet_rank": imagenet_rank, "nccl": nccl,
         "nccl_rank": nccl_rank}


def main(argv=None) -> int:
    part, args_path, out_path = (argv or sys.argv[1:])[:3]
    tune_allocator()
    result = PARTS[part](**json.loads(Path(args_path).read_text()))
    if not part.endswith("_rank") or result.get("rank0"):
        tmp = Path(f"{out_path}.tmp")
        tmp.write_text(json.dumps(result) + "\n")
        os.replace(tmp, out_path)  # whole or not at all: the guard may cut the part at any time
    return 0


if __name__ == "__main__":
    sys.exit(main())
