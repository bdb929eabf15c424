"""The GPU check, one bounded command for whoever has a GPU: ``python -m bench.gpu_check`` (every part
runs in its own process under a time guard, and the whole fits :data:`BUDGET_S`, 6 minutes; not
yet timed on a GPU). Prints one table and writes ``gpu_check.json``.

On generated data (CIFAR-shaped 32x32x3 images in CIFAR10's own format, read by the real cifar10
loader; ILSVRC-shaped JPEGs prepared into a memory-mapped imagenet128 set), in this order (the
most telling first, so a guard that cuts leaves the rest):

1. training images/s of ``ddpm-unet`` at batch 128 (--quick: unet-tiny), fp32 eager and the fast path (bf16 autocast,
   TF32, channels_last, fused AdamW), each with its peak GPU memory and data time (the drawing
   thread's CPU time per step; target under 5%); the fast path's speed-up (target at least 2x);
2. the ImageNet path: an ILSVRC-shaped folder prepared as a memory-mapped set, then a
   class-conditional adm-unet at 128 px trained by 2 torchrun processes (one GPU each where there
   are 2; else both on one GPU through gloo, named) and evaluated by both ranks (FID);
3. a paper-cifar10-shaped run (ddpm-unet, the suite's recipe) with an FID evaluation of 2,000
   samples (DDIM 100 steps);
4. the fast path with channels_last off, and with torch.compile;
5. the largest other network of the project that fits, fast path (dit-xl/2 at 32 px, else the next);
6. the tests that need CUDA (tests/test_distributed.py), when the repository's tests are at hand.

The FID parts need the Inception weights that ./setup.sh installs (offline). ``--device cpu
--quick`` runs every part at toy sizes on a CPU (a test does), so the check is known to work
before a GPU is lent. Speeds are measured side by side in one check; compare numbers only within
one gpu_check.json.
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
from bench.errors import BenchError
from bench.models.networks import ARCHS, count_parameters
from bench.tools.gpu_parts import REPO, error_line, run_bounded, size, write_cifar_like

EAGER = dict(precision="fp32", tf32=False, channels_last=False, fused_adamw=False, compile=False)
FAST = dict(precision="bf16", tf32=True, channels_last=True, fused_adamw=True, compile=False)

BUDGET_S = 6 * 60  # the whole check
GUARD_S = {  # each part's own limit (seconds, process start included); a part also stops at the budget
    "eager": 40, "fast": 30, "imagenet": 80, "paper_run": 60, "fast_nchw": 30, "compile": 70, "largest": 35,
    "cuda_tests": 30,
}
MIN_PART_S = 10  # a part that would get less than this is skipped, not started


class Parts:
    """Runs parts of the check in their own processes, each under min(its guard, the budget left)."""

    def __init__(self, work: Path, budget_s: float, scale: float = 1.0):
        self.work, self.scale, self.cut = work, scale, []
        self.deadline = time.perf_counter() + budget_s * scale

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, label: str, part: str, guard_s: float, **kwargs) -> dict:
        """`python -m bench.tools.gpu_parts PART` with `kwargs`: its result dict, or {"error": ...} when it
        failed, was cut at its guard, or was not started for want of budget."""
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
        if code is None:
            self.cut.append(label)
            return {"error": f"cut after {limit:.0f} s (its guard)", "part_s": seconds}
        if code != 0 or not out.is_file():
            return {"error": error_line(err), "part_s": seconds}
        return {**json.loads(out.read_text()), "part_s": seconds}


def largest_other_arch(exclude: str = "ddpm-unet", max_params: int | None = None) -> list[str]:
    """The project's other networks, largest first (parameters at 3 channels, 32x32, counted on the
    meta device: nothing is allocated), at most `max_params` (the quick mode's toy sizes)."""
    # DiTs at patch 2 only: /4 and /8 are the same network on 4x and 16x fewer tokens
    sizes = {a: count_parameters(a, 3, 32) for a in ARCHS if a != exclude and not a.endswith(("/4", "/8"))}
    return sorted((a for a in sizes if max_params is None or sizes[a] <= max_params), key=sizes.get, reverse=True)


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
    p.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
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
    started = time.perf_counter()
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "budget_s": args.budget,
              "environment": environment(device)}
    say = (lambda *a: None) if os.environ.get("DIFFBENCH_QUIET") else (lambda m: print(m, flush=True))
    with tempfile.TemporaryDirectory(prefix="diffbench-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("DIFFBENCH_CACHE", str(work / "cache"))  # the parts inherit it
        data = str(write_cifar_like(work / "data", size("train_images", args.quick), size("test_images", args.quick)))
        parts = Parts(work, args.budget, args.guard_scale)
        common = dict(data_dir=data, device=device, quick=args.quick)

        def measure(label: str, arch: str, setting: str, settings: dict) -> dict:
            say(f"{arch}, {setting} ...")
            return {"network": arch, "setting": setting,
                    **parts.run(label, "throughput", GUARD_S[label], arch=arch, settings=settings, **common)}

        net = "unet-tiny" if args.quick else "ddpm-unet"  # --quick: seconds on a CPU
        rows = [measure("eager", net, "fp32 eager", EAGER), measure("fast", net, "fast path", FAST)]
        say("ImageNet path: prepare, 2 processes, class-conditional network, evaluation on both ranks ...")
        result["imagenet"] = parts.run("imagenet", "imagenet_run", GUARD_S["imagenet"], device=device,
                                       quick=args.quick, work=str(work / "imagenet"),
                                       timeout_s=max(1.0, min(GUARD_S["imagenet"] * args.guard_scale, parts.left()) - 5))
        say("paper-cifar10-shaped run with FID ...")
        result["paper_run"] = parts.run("paper_run", "paper_run", GUARD_S["paper_run"], work=str(work), **common)
        rows.append(measure("fast_nchw", net, "fast, channels_last off", {**FAST, "channels_last": False}))
        if not (args.no_compile or args.quick or not device.startswith("cuda")):
            rows.append(measure("compile", net, "fast path + compile", {**FAST, "compile": True}))
        for arch in largest_other_arch(exclude=net, max_params=2_000_000 if args.quick else None)[:2]:
            row = measure("largest", arch, "fast path", FAST)
            rows.append(row)
            if row.get("error") != "out of memory":
                break
        result["throughput"] = rows
        result["cuda_tests"] = (cuda_tests(min(GUARD_S["cuda_tests"] * args.guard_scale, max(1.0, parts.left())))
                                if device.startswith("cuda") else {"skipped": "no GPU in use"})
        result["cut"] = parts.cut
    result["checks"] = checks(rows, device)
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"written: {args.out}")
    return 0


def checks(rows: list[dict], device: str) -> dict:
    """The issue's speed targets, read from the measurements (they apply on a GPU only)."""
    net = rows[0]["network"]  # ddpm-unet (--quick: unet-tiny)
    by = {(r["network"], r["setting"]): r for r in rows}
    eager, fast = by.get((net, "fp32 eager"), {}), by.get((net, "fast path"), {})
    nchw = by.get((net, "fast, channels_last off"), {})
    rate = lambda a, b: round(a["images_per_s"] / b["images_per_s"], 2) \
        if "images_per_s" in a and "images_per_s" in b else None  # noqa: E731
    ratio, data, gpu = rate(fast, eager), fast.get("data_fraction"), device.startswith("cuda")
    return {"fast_over_eager": ratio, "fast_over_eager_at_least_2x": (ratio >= 2.0) if ratio and gpu else None,
            "channels_last_on_over_off": rate(fast, nchw),
            "data_fraction_fast": data, "data_under_5_percent": (data < 0.05) if data is not None and gpu else None}


def render(result: dict) -> str:
    env = result["environment"]
    lines = [f"GPU check on {env.get('gpu') or env['device']} (torch {env['torch']}, CUDA {env['cuda']})"
             + (" -- quick, toy sizes" if result["quick"] else ""), "",
             f"{'network':<11} {'setting':<24} {'batch':>5} {'img/s':>9} {'step ms':>8} {'data ms':>8} "
             f"{'data %':>7} {'peak GiB':>8} {'part s':>7}"]
    for r in result["throughput"]:
        if "error" in r:
            lines.append(f"{r['network']:<11} {r['setting']:<24} {'':>5}  {r['error']}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"{r['network']:<11} {r['setting']:<24} {r['batch']:>5} {r['images_per_s']:>9.1f} "
                     f"{r['step_ms']:>8.1f} {r['data_ms']:>8.2f} {100 * r['data_fraction']:>6.1f}% {peak:>8} "
                     f"{r['part_s']:>7.1f}")
    c = result["checks"]
    lines += ["", f"fast path / fp32 eager ({result['throughput'][0]['network']}): {c['fast_over_eager']}x (target >= 2 on a GPU: "
              f"{_verdict(c['fast_over_eager_at_least_2x'])}); channels_last on / off: {c['channels_last_on_over_off']}x; "
              f"data time {c['data_fraction_fast']} of a step (target < 5%: {_verdict(c['data_under_5_percent'])})"]
    im = result["imagenet"]
    lines.append("ImageNet path: " + (f"failed: {im['error']}" if "error" in im else
                 f"{im['arch']} at {im['resolution']} px, class-conditional, {im['processes']} processes "
                 f"({im['backend']} on {im['device']}), memory-mapped {im['memory_mapped']}, prepare {im['prepare_s']} s, "
                 f"train {im['train_s']} s, evaluation on both ranks {im['eval_s']} s "
                 f"(FID-{im['eval_images']} {im['fid'] if im['fid'] is None else round(im['fid'], 1)}, "
                 f"{im['sample_precision']}): {im['state']}"))
    pr = result["paper_run"]
    lines.append("paper-cifar10-shaped run: " + (f"failed: {pr['error']}" if "error" in pr else
                 f"{pr['iters']} it x batch {pr['batch']} in {pr['train_s']} s ({pr['train_images_per_s']} img/s), "
                 f"FID-{pr['fid_images']} = {pr['fid'] if pr['fid'] is None else round(pr['fid'], 2)} (generated data: "
                 f"a plumbing check, not a quality number) in {pr['eval_s']} s"))
    ct = result["cuda_tests"]
    lines.append("CUDA tests: " + (ct["skipped"] if "skipped" in ct else f"{ct['summary']} (exit {ct['returncode']})"))
    cut = result.get("cut") or []
    lines.append(f"total: {result['seconds']} s of a {result['budget_s']:.0f} s budget"
                 + (f"; cut or skipped at their guards: {', '.join(cut)}" if cut else ""))
    return "\n".join(lines)


def _verdict(flag) -> str:
    return {True: "met", False: "NOT met", None: "not applicable"}[flag]


if __name__ == "__main__":
    sys.exit(main())
