"""A rehearsal of a suite: `python run_bench.py run SUITE --rehearse`.

The suite's own configuration, end to end, on the machine at hand, before its first GPU: every method
of the grid, every architecture, its evaluation and report, through the commands a user runs
(`run --dry-run`, `prepare`, `ref-stats`, `run`, `report`), each in its own process. Only what does not
change which code runs is made smaller, and the rehearsal prints each change:

- the networks' width and depth (DIFFBENCH_ARCH_OVERRIDES, read by bench.models.networks.build_model);
- iterations: the evaluation grid shrinks to the fewest points that still hold every report fraction
  and target; warm-up and checkpoint intervals keep their share of the budget;
- image counts: the smallest in the same order (<, =, >) as the real ones, so that N against each
  split's size, the final N above N, num_ref = "all" and N against the number of images a training job
  may compute features of (DIFFBENCH_TRAIN_COMPUTE_LIMIT, read by bench.eval.reference) stay as they are;
  each relation is printed, and one the rehearsal cannot keep is a problem of its verdict;
- the data: generated in the real data's format (cifar-10-batches-py; ILSVRC's JPEG tree, through
  `prepare imagenet128`), so a dataset without a test split stays without one;
- processes per run: gpus = N runs as min(N, PROCESSES_MAX) gloo processes (torchrun locally, N tasks
  under submitit), each with PER_PROCESS_BATCH images a step; seeds: the first `seeds` of the grid.

Slurm is rehearsed through submitit's local executor on one run, which is made to time out once: its
first attempt sends itself SIGUSR2 (Slurm's time-limit signal) after step iters / 2, so the job must
checkpoint, be requeued and end done; no clock is involved. Everything is written under
<results>/<suite>-rehearsal/ (the shrunk suite's results; its TOML, data and caches in _rehearsal/),
never into the real suite's folder nor the user's cache.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from bench.errors import BenchError, ConfigError
from bench.suite.rehearse_plan import ATTEMPTS_ENV, CLASSES, SIGNAL_ENV, Plan, plan_rehearsal, to_toml

REPO = Path(__file__).resolve().parents[2]


# -- the rehearsal: the user's commands, each in its own process ----------------------------------------


@dataclass
class Stage:
    name: str
    rc: int
    error: str | None = None  # the most telling line of a failed stage's output
    seconds: float = 0.0


def telling_line(lines: list[str]) -> str:
    """A failed command's `error:` line, else its last exception line, else the runner's summary (runs
    done and failed), else its last line."""
    lines = [x.strip() for x in lines if x.strip()]
    for pick in (lambda x: x.startswith("error:"), lambda x: re.match(r"^\w*(Error|Exception)\b", x),
                 lambda x: re.match(r"^suite \S+: \d+/\d+ done", x)):
        found = [x for x in lines if pick(x)]
        if found:
            return found[-1][:400]
    return (lines[-1] if lines else "(no output)")[:400]


def run_stage(name: str, args: list[str], env: dict, say) -> Stage:
    """`python run_bench.py ARGS` (or `python -m ...`: args starting with "-m"), its output echoed."""
    cmd = [sys.executable] + (args if args[0] == "-m" else [str(REPO / "run_bench.py")] + args)
    say(f"\n== {name}: python {' '.join(cmd[1:]).replace(str(REPO / 'run_bench.py'), 'run_bench.py')}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        say("   " + line.rstrip("\n"))
        tail = (tail + [line])[-200:]
    rc = proc.wait()
    return Stage(name, rc, None if rc == 0 else telling_line(tail), time.monotonic() - t0)


def generate_data(plan: Plan, env: dict, say) -> list[Stage]:
    """The generated stand-ins; imagenet128's through `prepare imagenet128`, as a user prepares ILSVRC."""
    from bench.data.generated import write_cifar_like, write_ilsvrc_like

    stages = []
    for name, where, small in plan.datasets:
        if name == "cifar10":
            write_cifar_like(where, small["train"], small["test"])
            continue
        src = write_ilsvrc_like(where.parent / "ILSVRC2012-like", small["train"], classes=CLASSES)
        stages.append(run_stage("prepare", ["prepare", "imagenet128", str(src), "--out", str(where), "--workers", "1"],
                                env, say))
    return stages


def signalled_train(run, out_dir, events=None):
    """bench.train.loop.train, whose first attempt sends its own process SIGUSR2 (Slurm's time-limit
    signal, as submitit's local executor forwards it to every task) right after step $SIGNAL_ENV; rank 0
    appends each attempt's first step to $ATTEMPTS_ENV. The rehearsal's requeue stage trains with it."""
    from bench.train import loop
    from bench.train.run_folder import read_status

    start = (read_status(Path(out_dir)) or {}).get("step", 0)
    if os.environ.get("RANK", "0") == "0":
        with open(os.environ[ATTEMPTS_ENV], "a") as f:
            f.write(f"{start}\n")
    if start:
        return loop.train(run, out_dir, events)
    at = int(os.environ[SIGNAL_ENV])

    class Signal(loop.TrainEvents):
        def on_step(self, step, iters, row):
            if events is not None:
                events.on_step(step, iters, row)
            if step == at:
                os.kill(os.getpid(), signal.SIGUSR2)

        def on_eval(self, step, rows):
            if events is not None:
                events.on_eval(step, rows)

    return loop.train(run, out_dir, Signal())


def requeue_stage(toml: str, results_root: str, key: str, plugins: list[str]) -> int:
    """One run through submitit's local executor, trained by :func:`signalled_train` (the requeue stage)."""
    from bench.suite.grid import load_suite
    from bench.suite.runner import run_suite

    try:
        result = run_suite(load_suite(toml, plugins=plugins), executor="submitit-local", results_root=results_root,
                           only=[key], train_fn="bench.suite.rehearse:signalled_train")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


def rehearse(suite: str, results_root: str | os.PathLike, plugins: list[str] = (), seeds: int = 1, say=print) -> int:
    """Rehearse `suite` (a name under suites/ or a TOML file) into <results_root>/<suite>-rehearsal;
    print every stage and a verdict; 0 when every stage passed, every run ended done and the requeued
    job resumed, else 1."""
    from bench.suite.grid import suite_path

    path = suite_path(suite)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid suite file ({exc}); `run {suite} --dry-run` says more") from None
    folder = Path(results_root) / f"{data.get('suite', {}).get('name') or path.stem}-rehearsal"
    if folder.exists():
        raise ConfigError(f"{folder} holds an earlier rehearsal; remove it (rm -r {folder}) or pass another --results")
    work = folder / "_rehearsal"
    plan = plan_rehearsal(data, path, work, seeds)
    say(f"rehearsal of {path.name} into {folder}; shrunk:\n" + "\n".join(f"  {c}" for c in plan.changes))
    if plan.relations:
        say("image counts against each other:\n" + "\n".join(f"  {r}" for r in plan.relations))
    flags = [a for p in plugins for a in ("--plugins", str(Path(p).resolve()))]
    stages = [run_stage("dry run of the suite as shipped", flags + ["--results", str(results_root), "run", str(path),
                                                                    "--dry-run"], dict(os.environ), say)]
    env = {**os.environ, **plan.env, "DIFFBENCH_CACHE": str(work / "cache"), "COLUMNS": "160",  # tables unwrapped
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    toml = work / f"{plan.name}.toml"
    toml.parent.mkdir(parents=True)
    toml.write_text(to_toml(plan.data, [f"The rehearsal of {path} (bench/suite/rehearse.py): its own settings, "
                                        "with what was shrunk:"] + plan.changes))
    stages += generate_data(plan, env, say)
    stages.append(run_stage("ref-stats", flags + ["ref-stats", str(toml)], env, say))
    attempts, at = work / "attempts.log", plan.data["budget"]["iters"] // 2
    try:
        runs = _suite_runs(toml, plugins)
    except BenchError as exc:  # nothing more to rehearse; the dry run above says whether the real suite loads
        return _verdict(plan, stages + [Stage("the rehearsal's suite", 2, f"error: {exc}")], [], Path(results_root),
                        attempts, say)
    stages.append(run_stage("Slurm through submitit's local executor, one run timed out at step "
                            f"{at} and requeued", ["-m", __name__, "requeue", str(toml), str(results_root),
                                                   runs[0].key] + list(plugins),
                            {**env, SIGNAL_ENV: str(at), ATTEMPTS_ENV: str(attempts)}, say))
    jobs = max(1, min(4, (os.cpu_count() or 1) // plan.data["train"].get("gpus", 1)))
    stages.append(run_stage("run", flags + ["--results", str(results_root), "run", str(toml), "--jobs", str(jobs),
                                            "--no-report"], env, say))
    stages.append(run_stage("report", flags + ["--results", str(results_root), "report", plan.name], env, say))
    return _verdict(plan, stages, runs, Path(results_root), attempts, say)


def _suite_runs(toml: Path, plugins) -> list:
    from bench.suite.grid import load_suite

    return load_suite(toml, plugins=plugins).runs()


def _verdict(plan: Plan, stages: list[Stage], runs: list, root: Path, attempts: Path, say) -> int:
    """Every problem in one list: failed stages, runs not done (grouped by reason), the requeue not seen,
    relations not kept. 0 when there is none."""
    from bench.train.run_folder import read_status

    problems = [f"{s.name}: {s.error}" for s in stages if s.rc != 0]
    left: dict[str, list[str]] = {}
    for r in runs:
        status = read_status(r.run_dir(root)) or {}
        if status.get("state") != "done":
            why = f"{status.get('state', 'never started')} at step {status.get('step', 0)}: {status.get('reason')}"
            left.setdefault(why, []).append(r.key)
    problems += [f"{len(keys)} of {len(runs)} runs {why} (e.g. {keys[0]})" for why, keys in left.items()]
    starts = [int(x) for x in attempts.read_text().split()] if attempts.exists() else []
    if not (len(starts) >= 2 and starts[0] == 0 and starts[-1] > 0 and runs
            and (read_status(runs[0].run_dir(root)) or {}).get("state") == "done"):
        problems.append(f"the requeue was not rehearsed: the timed-out run's attempts started at steps {starts or 'none'} "
                        "(expected 0, then a resumed step) and it must end done")
    problems += [f"relation not kept: {b}" for b in plan.broken]
    say(f"\nrehearsal of {plan.name.removesuffix('-rehearsal')}: " + ("passed: every stage, every run done, the "
        f"requeued job resumed at step {starts[-1]}" if not problems else f"{len(problems)} problem(s)"))
    for p in problems:
        say(f"  - {p}")
    say("  time: " + ", ".join(f"{s.name.split(',')[0]} {s.seconds:.0f} s" for s in stages))
    return 0 if not problems else 1


if __name__ == "__main__":  # the requeue stage: python -m bench.suite.rehearse requeue TOML RESULTS KEY [PLUGIN ...]
    if sys.argv[1:2] != ["requeue"] or len(sys.argv) < 5:
        sys.exit("usage: python -m bench.suite.rehearse requeue TOML RESULTS KEY [PLUGIN ...] (run SUITE --rehearse "
                 "runs it)")
    sys.exit(requeue_stage(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
