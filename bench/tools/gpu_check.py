"""The GPU check, one bounded command for whoever has a GPU: ``python -m bench.gpu_check``. Every part
runs in its own process under a time guard (bench/tools/gpu_guard.py: a cut part leaves no process
behind, torchrun's workers included), and the whole stops at :data:`BUDGET_S`, 8 minutes, so that it
answers in one 10-minute lease of one GPU; its own estimate (:data:`PART_S`) is printed up front. Not
yet timed on a GPU. Prints one table and writes ``gpu_check.json``, which prices a suite's dry run
(``run SUITE --dry-run --gpu-check gpu_check.json``).

On generated data (CIFAR-shaped images in CIFAR10's own format; ILSVRC-shaped JPEGs prepared into the
memory-mapped imagenet128 set), the most telling first so that the budget cuts the rest:

1. training rows, each with images/s, achieved TFLOP/s (3 x the forward's FLOPs per image),
   utilization against the device's dense peak (bench.suite.cost.DEVICE_PEAK_TFLOPS), peak memory
   and the data wait's share of a step (target under 5%): ddpm-unet at batch 128 in fp32 eager, TF32
   and the bf16 fast path, and the fast path with channels_last the other way; adm-unet at 128 px,
   32 per GPU, class-conditional, in bf16 and TF32, and channels_last the other way; DiT-XL/2 in bf16;
2. ADM's DDIM sampling in bf16 (images/s, network evaluations/s); clean-fid's Inception at batch 500;
3. the ImageNet path (2 torchrun processes: NCCL on 2 GPUs, else gloo sharing one), sized to finish
   in 90 s; the NCCL slice with 2 or more GPUs ("skipped: one GPU" otherwise);
4. a paper-cifar10-shaped run with an FID of 2,000 samples; the tests that need CUDA;
   torch.compile only with ``--compile``.

``--device cpu --quick`` runs every part at toy sizes on a CPU (a slow-tier test does), so the check
is known to work before a GPU is lent. Compare speeds only within one gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench.core.runtime import resolve_device
from bench.data.generated import write_cifar_like
from bench.errors import BenchError
from bench.tools.gpu_parts import REPO, error_line, run_bounded, size

BUDGET_S = 8 * 60  # the whole check: one 10-minute lease, with its start and the copy back
#: each part's (estimate at full size on one GPU, guard) in seconds, its process's start included
PART_S = {"prepare": (15, 40), "ddpm": (50, 80), "adm": (55, 90), "dit": (25, 45), "sampling": (20, 40),
          "inception": (15, 35), "imagenet": (60, 90), "nccl": (30, 45), "paper_run": (60, 75),
          "cuda_tests": (30, 30), "compile": (70, 90)}
MIN_PART_S = 10  # a part that would get less than this is skipped, not started

FAST = {"setting": "fast path", "precision": "bf16"}
FLIP = {"setting": "fast, channels_last flipped", "precision": "bf16", "channels_last": "flip", "variant": True}
ROWS = {  # the training rows of each network (bench.tools.gpu_rows.train_rows)
    "ddpm": [{"setting": "fp32 eager", "precision": "fp32"}, {"setting": "TF32", "precision": "tf32"}, FAST, FLIP],
    "adm": [FAST, {"setting": "TF32", "precision": "tf32"}, FLIP],
    "dit": [FAST],
    "compile": [{"setting": "fast path + compile", "precision": "bf16", "compile": True, "variant": True}],
}


class Parts:
    """Runs parts of the check in their own processes, each under min(its guard, the budget left)."""

    def __init__(self, work: Path, budget_s: float, scale: float = 1.0):
        self.work, self.scale, self.cut = work, scale, []
        self.deadline = time.perf_counter() + budget_s * scale

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, label: str, part: str, guard_s: float, **kwargs) -> dict:
        """`python -m bench.tools.gpu_parts PART` with `kwargs`: its result dict, or {"error": ...} when it
        failed, was cut at its guard (with what it had written by then), or was not started for want of
        budget."""
        limit = min(guard_s * self.scale, self.left())
        if limit < MIN_PART_S:
            self.cut.append(label)
            return {"error": "skipped: the check's time budget is spent"}
        args, out = self.work / f"{label}.args.json", self.work / f"{label}.out.json"
        args.write_text(json.dumps(kwargs))
        out.unlink(missing_ok=True)
        start = time.perf_counter()
        code, _, err = run_bounded([sys.executable, "-m", "bench.tools.gpu_parts", part, str(args), str(out)], limit,
                                   cwd=REPO)
        seconds = round(time.perf_counter() - start, 1)
        try:  # a part cut while writing its final file still has its last complete one
            done = json.loads(out.read_text()) if out.is_file() else {}
        except ValueError:
            done = {}
        if code is None:
            self.cut.append(label)
            return {**done, "error": f"cut after {limit:.0f} s (its guard)", "part_s": seconds}
        if code != 0 or not done:
            return {"error": error_line(err), "part_s": seconds}
        return {**done, "part_s": seconds}

    def guard(self, label: str) -> float:
        return PART_S[label][1]


def plan(device: str, gpus: int, compile_: bool) -> list[str]:
    """The parts this check runs, in order."""
    cuda = device.startswith("cuda")
    return [p for p in PART_S if (p != "nccl" or gpus >= 2) and (p != "cuda_tests" or cuda)
            and (p != "compile" or (compile_ and cuda))]


def train_rows(parts: Parts, label: str, data: str | None, common: dict, role: str | None = None) -> list[dict]:
    """The rows ROWS[label] of the network `role` (default: `label`), those its part did not finish
    marked with the part's error."""
    specs, role = ROWS[label], role or label
    if data is None:
        return [{"role": role, "network": role, **s, "error": "no data: its preparation failed"} for s in specs]
    res = parts.run(label, "train_rows", parts.guard(label), role=role, rows=specs, data_dir=data, **common,
                    out=str(parts.work / f"{label}.out.json"))
    rows = res.get("rows", [])
    return rows + [{"role": role, "network": rows[0]["network"] if rows else role, **s, "error": res.get("error")}
                   for s in specs[len(rows):]]


def environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "platform": platform.platform(), "device": device}
    if torch.cuda.is_available() and device != "cpu":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
    return env


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (default), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (about 70 s more)")
    p.add_argument("--no-compile", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole check (default {BUDGET_S})")
    p.add_argument("--guard-scale", type=float, default=1.0,
                   help="multiply every guard and the budget (a slow or loaded machine; the CPU test)")
    p.add_argument("--out", default="gpu_check.json", help="where to write the results (default gpu_check.json)")
    args = p.parse_args(argv)
    try:
        device = str(resolve_device(args.device))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started, env = time.perf_counter(), environment(device)
    todo = plan(device, env.get("gpus", 0), args.compile and not args.no_compile)
    estimate = sum(PART_S[t][0] for t in todo)
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "budget_s": args.budget,
              "estimate_s": estimate, "parts": todo, "environment": env}
    say = (lambda *a: None) if os.environ.get("DIFFBENCH_QUIET") else (lambda m: print(m, flush=True))
    print(f"GPU check: {len(todo)} parts, {estimate} s by its own estimate at full size on one GPU "
          f"({', '.join(f'{t} {PART_S[t][0]}' for t in todo)}); budget {args.budget:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="diffbench-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("DIFFBENCH_CACHE", str(work / "cache"))  # the parts inherit it
        data = str(write_cifar_like(work / "data", size("train_images", args.quick), size("test_images", args.quick)))
        result.update(run_parts(Parts(work, args.budget, args.guard_scale), todo, data, device, args.quick, say))
    result["checks"] = checks(result["throughput"], device)
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    # rendering: its own module (this one's length)
    from bench.tools.gpu_report import render

    print(render(result))
    print(f"written: {args.out}")
    return 0


def run_parts(parts: Parts, todo: list[str], data: str, device: str, quick: bool, say) -> dict:
    """Every part of `todo`, in order; the results by section of gpu_check.json."""
    common, work, out = dict(device=device, quick=quick), parts.work, {}
    say("ImageNet-shaped set: prepare ...")
    prep = parts.run("prepare", "prepare_imagenet", parts.guard("prepare"), quick=quick, work=str(work / "imagenet"))
    rows = []
    for role in ("ddpm", "adm", "dit"):
        say(f"training rows: {role} ...")
        rows += train_rows(parts, role, prep.get("prepared") if role == "adm" else data, common)
    say("ADM sampling in bf16, Inception at batch 500 ...")
    out["sampling"] = [{"network": "adm-unet", **parts.run("sampling", "sampling", parts.guard("sampling"), **common)}]
    out["inception"] = parts.run("inception", "inception", parts.guard("inception"), **common)
    say("ImageNet path: 2 processes, class-conditional, evaluation on both ranks ...")
    out["imagenet"] = (parts.run("imagenet", "imagenet_run", parts.guard("imagenet"), **common, work=str(work / "imagenet"),
                                 prepared=prep["prepared"], timeout_s=_inner(parts, "imagenet"))
                       if "prepared" in prep else {"error": f"no data: its preparation failed ({prep.get('error')})"})
    gpus_note = "one GPU" if device.startswith("cuda") else "no GPU in use"
    out["nccl"] = (parts.run("nccl", "nccl", parts.guard("nccl"), **common, work=str(work), timeout_s=_inner(parts, "nccl"))
                   if "nccl" in todo else {"skipped": gpus_note})
    say("paper-cifar10-shaped run with FID ...")
    out["paper_run"] = parts.run("paper_run", "paper_run", parts.guard("paper_run"), data_dir=data, work=str(work), **common)
    if "compile" in todo:
        rows += train_rows(parts, "compile", data, common, role="ddpm")
    out["throughput"] = rows
    out["cuda_tests"] = (cuda_tests(min(PART_S["cuda_tests"][1] * parts.scale, max(1.0, parts.left())))
                         if "cuda_tests" in todo else {"skipped": "no GPU in use"})
    out["prepare"], out["cut"] = prep, parts.cut
    return out


def _inner(parts: Parts, label: str) -> float:
    """A torchrun inside a part: its own limit, a little under the part's."""
    return max(1.0, min(PART_S[label][1] * parts.scale, parts.left()) - 5)


def checks(rows: list[dict], device: str) -> dict:
    """The speed targets, read from the rows (they apply on a GPU only)."""
    by = {(r["role"], r["setting"]): r for r in rows if "images_per_s" in r}
    flipped = {r["role"]: r for r in rows if r.get("channels_last") is not None and r["setting"].startswith("fast, ")
               and "images_per_s" in r}
    rate = lambda a, b: round(a["images_per_s"] / b["images_per_s"], 2) if a and b else None  # noqa: E731
    gpu = device.startswith("cuda")
    fast, eager = by.get(("ddpm", "fast path")), by.get(("ddpm", "fp32 eager"))
    ratio = rate(fast, eager)
    out = {"fast_over_eager": ratio, "fast_over_eager_at_least_2x": (ratio >= 2.0) if ratio and gpu else None}
    for role in ("ddpm", "adm"):
        f, x = by.get((role, "fast path")), flipped.get(role)
        on, off = (f, x) if f and f["channels_last"] else (x, f)
        out[f"channels_last_on_over_off_{role}"] = rate(on, off)
        share = f.get("data_fraction") if f else None
        out[f"data_fraction_{role}"] = share
        out[f"data_under_5_percent_{role}"] = (share < 0.05) if share is not None and gpu else None
    out["channels_last_on_over_off"] = out["channels_last_on_over_off_ddpm"]  # the name before adm-unet's rows
    return out


if __name__ == "__main__":
    sys.exit(main())
