"""The GPU check, one command for whoever has a GPU: ``python -m bench.gpu_check`` (sized for a
few minutes on one data-centre GPU, not yet timed on one; its subprocesses are cut at 8 minutes). Prints a table and writes ``gpu_check.json``.

In one process, on generated CIFAR-shaped data (32x32x3 uint8 written in CIFAR10's own format,
read by the real cifar10 loader):

1. training images/s of ``ddpm-unet`` at batch 128 with the fast path on (bf16 autocast, TF32,
   channels_last, fused AdamW) and off (fp32 eager), and with torch.compile, each with its peak
   GPU memory and the data pipeline's time per step against the step's (target: under 5%);
   the speed-up of the fast path over fp32 eager (target: at least 2x);
   (data time is the CPU's drawing of the next batch, which overlaps the GPU's step: an upper
   bound on what the data pipeline costs);
2. the same for the largest other network of the project that fits (dit-xl/2 at 32 px, else the
   next one down; --quick: the largest under 2M parameters);
3. a 300-iteration paper-cifar10-shaped run (ddpm-unet, batch 128, the suite's optimizer and
   schedule) with one FID evaluation of 2,000 samples (DDIM 100 steps) on the GPU;
4. ``torchrun`` with 2 processes on the one GPU (or one per GPU when there are more) for 20 steps;
5. the tests that need CUDA (tests/test_distributed.py), when the repository's tests are at hand.

The FID part needs the Inception weights that ./setup.sh installs (offline). ``--device cpu
--quick`` runs every part at toy sizes on a CPU in seconds (a test does), so the
check is known to work before a GPU is lent. Speeds are measured side by side in this one
process; compare numbers only within one gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.core.config import TrainConfig
from bench.core.perf import tune_allocator
from bench.core.runtime import resolve_device
from bench.errors import BenchError
from bench.models.networks import ARCHS, count_parameters
from bench.train.loop import settle, setup, step, train, train_step
from bench.train.resolve import resolve_run

REPO = Path(__file__).resolve().parents[2]

EAGER = dict(precision="fp32", tf32=False, channels_last=False, fused_adamw=False, compile=False)
FAST = dict(precision="bf16", tf32=True, channels_last=True, fused_adamw=True, compile=False)
SIZES = {  # full check / --quick
    "batch": (128, 4), "warmup": (15, 1), "steps": (40, 2), "train_images": (10_000, 64), "test_images": (2_000, 16),
    "paper_iters": (300, 3), "fid_images": (2_000, 8), "sampler_steps": (100, 2), "torchrun_steps": (20, 2),
}


BUDGET_S = 8 * 60  # the whole check; a part that would overrun it is cut and reported


def size(name: str, quick: bool) -> int:
    return SIZES[name][1 if quick else 0]


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
    for pick in (lambda x: x.startswith("error:"), lambda x: "Error" in x.split(":")[0]):
        found = [line for line in lines if pick(line)]
        if found:
            return found[-1][:300]
    return (lines[-1] if lines else "(no output)")[:300]


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


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(arch: str, settings: dict, data_dir: Path, device: str, quick: bool) -> dict:
    """Training images/s of `arch` at the check's batch with `settings`, peak memory, data time."""
    import torch

    batch = size("batch", quick)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(data_dir), arch=arch, batch_size=batch, iters=1_000_000,
                      warmup=0, lr=2e-4, flip=True, device=device, **settings)
    out = {"arch": arch, "batch": batch, **settings}
    cuda = device.startswith("cuda")
    state = None
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
    except Exception as exc:  # noqa: BLE001 -- a part that fails is reported, the others go on
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    finally:
        del state
        if cuda:
            torch.cuda.empty_cache()
    return out


def largest_other_arch(exclude: str = "ddpm-unet", max_params: int | None = None) -> list[str]:
    """The project's other networks, largest first (parameters at 3 channels, 32x32, counted on the
    meta device: nothing is allocated), at most `max_params` (the quick mode's toy sizes)."""
    # DiTs at patch 2 only: /4 and /8 are the same network on 4x and 16x fewer tokens
    sizes = {a: count_parameters(a, 3, 32) for a in ARCHS if a != exclude and not a.endswith(("/4", "/8"))}
    return sorted((a for a in sizes if max_params is None or sizes[a] <= max_params), key=sizes.get, reverse=True)


def paper_run(data_dir: Path, device: str, quick: bool, work: Path) -> dict:
    """A paper-cifar10-shaped run: ddpm-unet, the suite's recipe, one FID evaluation at the end."""
    iters = size("paper_iters", quick)
    n = size("fid_images", quick)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(data_dir), arch="ddpm-unet", flip=True, iters=iters,
                      batch_size=size("batch", quick), lr=2e-4, warmup=min(5000, iters), grad_clip=1.0,
                      ema_decay=0.9999, ckpt_every=iters, eval_every=iters, device=device,
                      eval={"metrics": ["fid"], "num_images": n, "num_ref": n, "ref_split": "train",
                            "sampler": "ddim", "sampler_steps": size("sampler_steps", quick),
                            "timestep_spacing": "linspace", "batch_size": 500 if not quick else n,
                            "cache_dir": str(work / "eval-cache")})
    start = time.perf_counter()
    try:
        status = train(cfg, work / "paper-run")
        wall = time.perf_counter() - start
        evals = [json.loads(line) for line in (work / "paper-run" / "evals.jsonl").read_text().splitlines()]
    except Exception as exc:  # noqa: BLE001 -- e.g. no Inception weights on a machine without ./setup.sh
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
    runtime = json.loads((work / "paper-run" / "config.json").read_text())["runtime"][-1]
    return {"iters": iters, "batch": cfg.batch_size, "wall_s": round(wall, 1),
            "train_s": round(status["train_seconds"], 1), "eval_s": round(status["eval_seconds"], 1),
            "train_images_per_s": round(iters * cfg.batch_size / status["train_seconds"], 1),
            "fid": evals[-1]["value"] if evals else None, "fid_images": n,
            "sample_s": evals[-1].get("sample_seconds") if evals else None, "runtime": runtime}


def torchrun_check(data_dir: Path, device: str, quick: bool, work: Path, timeout_s: float) -> dict:
    """`torchrun --nproc_per_node N run_bench.py train` for a few steps (N = 2 on one GPU or a CPU)."""
    import torch

    n = max(2, torch.cuda.device_count()) if device.startswith("cuda") or (
        device == "auto" and torch.cuda.is_available()) else 2
    steps = size("torchrun_steps", quick)
    arch = "unet-tiny" if quick else "ddpm-unet"
    batch = size("batch", quick)
    batch -= batch % n
    out = work / "torchrun-run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(REPO / "run_bench.py"), "train", "--dataset", "cifar10", "--data-dir", str(data_dir), "--arch", arch,
           "--iters", str(steps), "--batch-size", str(batch), "--warmup", "0", "--device",
           "cpu" if device == "cpu" else "auto", "--out", str(out)]
    start = time.perf_counter()
    code, _, err = run_bounded(cmd, timeout_s)
    res = {"processes": n, "arch": arch, "steps": steps, "batch": batch, "returncode": code,
           "wall_s": round(time.perf_counter() - start, 1)}
    if code != 0:
        res["error"] = f"cut after {timeout_s:.0f} s (the check's time budget)" if code is None else error_line(err)
        return res
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    runtime = json.loads((out / "config.json").read_text())["runtime"][-1]
    late = rows[len(rows) // 2:]
    res.update(backend=runtime["backend"], device=runtime["device"], final_loss=rows[-1]["loss"],
               images_per_s=round(sum(r["images_per_s"] for r in late) / len(late), 1))
    return res


def cuda_tests(timeout_s: float) -> dict:
    """tests/test_distributed.py's `cuda` tests (the test suite hides GPUs from every other test)."""
    tests = REPO / "tests" / "test_distributed.py"
    if not tests.exists():
        return {"skipped": "the repository's tests are not here"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed"}
    code, out, _ = run_bounded([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(tests)],
                               timeout_s, cwd=REPO, env={**os.environ, "DIFFBENCH_TEST_CUDA": "1"})
    if code is None:
        return {"returncode": None, "summary": f"cut after {timeout_s:.0f} s (the check's time budget)"}
    return {"returncode": code, "summary": (out.strip().splitlines() or [""])[-1]}


def environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "platform": platform.platform(), "device": device}
    if torch.cuda.is_available() and device != "cpu":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (default), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds): checks that every part runs")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    p.add_argument("--out", default="gpu_check.json", help="where to write the results (default gpu_check.json)")
    args = p.parse_args(argv)

    tune_allocator()
    try:
        device = str(resolve_device(args.device))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "environment": environment(device)}
    with tempfile.TemporaryDirectory(prefix="diffbench-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("DIFFBENCH_CACHE", str(work / "cache"))
        data = write_cifar_like(work / "data", size("train_images", args.quick), size("test_images", args.quick))
        say = (lambda *a: None) if os.environ.get("DIFFBENCH_QUIET") else print

        rows = []
        for name, settings in (("fp32 eager", EAGER), ("fast path", FAST),
                               ("fast path + compile", {**FAST, "compile": True})):
            if settings["compile"] and (args.no_compile or args.quick or not device.startswith("cuda")):
                continue
            say(f"measuring ddpm-unet, {name} ...")
            rows.append({"network": "ddpm-unet", "setting": name,
                         **throughput("ddpm-unet", settings, data, device, args.quick)})
        for arch in largest_other_arch(max_params=2_000_000 if args.quick else None):
            say(f"measuring {arch} ...")
            pair = [{"network": arch, "setting": name, **throughput(arch, settings, data, device, args.quick)}
                    for name, settings in (("fp32 eager", EAGER), ("fast path", FAST))]
            rows += pair
            if not any(r.get("error") == "out of memory" for r in pair):
                break
        result["throughput"] = rows
        say("paper-cifar10-shaped run ...")
        result["paper_run"] = paper_run(data, device, args.quick, work)
        say("torchrun ...")
        left = lambda: BUDGET_S - (time.perf_counter() - started)  # noqa: E731
        result["torchrun"] = torchrun_check(data, device, args.quick, work, max(60.0, left() - 60))
        result["cuda_tests"] = (cuda_tests(max(30.0, left())) if device.startswith("cuda")
                                else {"skipped": "no GPU in use"})
    result["checks"] = checks(rows, device)
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"written: {args.out}")
    return 0


def checks(rows: list[dict], device: str) -> dict:
    """The issue's speed targets, read from the measurements (they apply on a GPU only)."""
    by = {(r["network"], r["setting"]): r for r in rows}
    eager, fast = by.get(("ddpm-unet", "fp32 eager"), {}), by.get(("ddpm-unet", "fast path"), {})
    ratio = (fast["images_per_s"] / eager["images_per_s"]) if "images_per_s" in fast and "images_per_s" in eager else None
    data = fast.get("data_fraction")
    gpu = device.startswith("cuda")
    return {"fast_over_eager": round(ratio, 2) if ratio else None,
            "fast_over_eager_at_least_2x": (ratio >= 2.0) if ratio and gpu else None,
            "data_fraction_fast": data, "data_under_5_percent": (data < 0.05) if data is not None and gpu else None}


def render(result: dict) -> str:
    env = result["environment"]
    lines = [f"GPU check on {env.get('gpu') or env['device']} (torch {env['torch']}, CUDA {env['cuda']})"
             + (" -- quick, toy sizes" if result["quick"] else ""), "",
             f"{'network':<11} {'setting':<20} {'batch':>5} {'img/s':>9} {'step ms':>8} {'data ms':>8} "
             f"{'data %':>7} {'peak GiB':>8}"]
    for r in result["throughput"]:
        if "error" in r:
            lines.append(f"{r['network']:<11} {r['setting']:<20} {r['batch']:>5}  {r['error']}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"{r['network']:<11} {r['setting']:<20} {r['batch']:>5} {r['images_per_s']:>9.1f} "
                     f"{r['step_ms']:>8.1f} {r['data_ms']:>8.2f} {100 * r['data_fraction']:>6.1f}% {peak:>8}")
    c = result["checks"]
    lines += ["", f"fast path / fp32 eager (ddpm-unet): {c['fast_over_eager']}x (target >= 2 on a GPU: "
              f"{_verdict(c['fast_over_eager_at_least_2x'])}); data time {c['data_fraction_fast']} of a step "
              f"(target < 5%: {_verdict(c['data_under_5_percent'])})"]
    pr = result["paper_run"]
    lines.append("paper-cifar10-shaped run: " + (pr["error"] if "error" in pr else
                 f"{pr['iters']} it x batch {pr['batch']} in {pr['train_s']} s ({pr['train_images_per_s']} img/s), "
                 f"FID-{pr['fid_images']} = {pr['fid'] if pr['fid'] is None else round(pr['fid'], 2)} (generated data: "
                 "a plumbing check, not a quality number) "
                 f"in {pr['eval_s']} s"))
    tr = result["torchrun"]
    lines.append(f"torchrun, {tr['processes']} processes, {tr['arch']}, {tr['steps']} steps: "
                 + (f"failed: {tr['error']}" if "error" in tr else
                    f"ok ({tr['backend']} on {tr['device']}, {tr['images_per_s']} img/s, {tr['wall_s']} s wall)"))
    ct = result["cuda_tests"]
    lines.append("CUDA tests: " + (ct["skipped"] if "skipped" in ct else f"{ct['summary']} (exit {ct['returncode']})"))
    lines.append(f"total: {result['seconds']} s")
    return "\n".join(lines)


def _verdict(flag) -> str:
    return {True: "met", False: "NOT met", None: "not applicable"}[flag]


if __name__ == "__main__":
    sys.exit(main())
