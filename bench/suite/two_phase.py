"""The two phases of a suite with a [tune] table (bench/suite/tuning.py has the rule): the tuning runs,
the choice, then the headline at the chosen learning rates; and the dry run that prices both."""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from bench import fileio
from bench.suite.cost import estimate_cost, format_duration
from bench.suite.tuning import decide, headline_suite, tuning_suite
from bench.train.run_folder import RunOutcome, SuiteResult, is_diverged, read_status


def run_tuned(suite, run_suite, reporter, *, dry_run: bool, only, results_root, **kw) -> SuiteResult:
    """Both phases (module docstring): the tuning runs, the choice, then the headline at the chosen rates."""
    tsuite = tuning_suite(suite)
    select = lambda runs: [r for r in runs if not only or any(  # noqa: E731
        fnmatch.fnmatchcase(r.key, p) for p in ([only] if isinstance(only, str) else only))]
    t_runs = select(tsuite.runs())
    if dry_run:
        return _plan_both(suite, tsuite, t_runs, select, run_suite, results_root, reporter, **kw)
    outcomes = []
    if t_runs:
        reporter.message(f"phase 1 of 2, tuning: {len(t_runs)} runs in {Path(results_root) / tsuite.name}")
        done = run_suite(tsuite.subset(t_runs), dry_run=False, results_root=results_root, progress=reporter, **kw)
        # a diverged tuning run is a result (that learning rate loses), not a failure of the command
        outcomes += [o for o in done.outcomes if not (o.state == "failed" and is_diverged(read_status(o.run_dir) or {}))]
    head, waiting = headline_suite(suite, decide(suite, results_root, reporter.message))
    h_runs = select(head.runs())
    if waiting:
        reporter.message(f"the headline runs of {', '.join(waiting)} wait for their tuning runs to finish (run again)")
        outcomes += [RunOutcome(f"{w.name}/{label}/seed{s}", str(Path(results_root) / suite.name / w.name / label / f"seed{s}"),
                                "todo", "waiting for tuning") for w in suite.workloads for label in waiting
                     for s in suite.seeds]
    if h_runs:
        reporter.message(f"phase 2 of 2, headline at the chosen learning rates: {len(h_runs)} runs")
        outcomes += run_suite(head.subset(h_runs), dry_run=False, results_root=results_root, progress=reporter,
                              **kw).outcomes
    return SuiteResult(suite.name, Path(results_root) / suite.name, outcomes)


def _plan_both(suite, tsuite, t_runs, select, run_suite, results_root, reporter, **kw) -> SuiteResult:
    """The dry run of both phases, each priced, and their sum."""
    path = Path(results_root) / suite.name / "tuning.json"
    methods = fileio.read_json(path).get("methods", {}) if path.exists() else {}
    head, waiting = headline_suite(suite, methods)
    if waiting:  # priced at the learning rate they have now: the choice does not change the cost
        head = dataclasses.replace(head, methods=suite.methods, _runs=[])
    h_runs = select(head.runs())
    plans, total, todo = [], 0.0, 0.0
    t = suite.tune
    for title, s, runs in ((f"phase 1 of 2, tuning: {len(t['methods'])} methods x {len(t['lr_factors'])} learning "
                            f"rates (x {', '.join(f'{f:g}' for f in t['lr_factors'])}) x {len(t['seeds'])} tuning "
                            f"seeds to {t['budget']} iterations", tsuite, t_runs),
                           ("phase 2 of 2, headline on the held-out seeds at the chosen learning rates ("
                            + ("recorded in tuning.json" if not waiting else "not chosen yet: priced at the shared one")
                            + ")", head, h_runs)):
        if not runs:
            continue
        reporter.message(title)
        res = run_suite(s.subset(runs), dry_run=True, results_root=results_root, progress=reporter, **kw)
        plans.append(f"{title}\n{res.plan}")
        est = estimate_cost(s.subset(runs))
        total += est.total_s
        todo += sum(c.total_s for r, c in est.runs if (read_status(r.run_dir(results_root)) or {}).get("state") != "done")
    jobs = max(1, int(kw.get("jobs", 1)))
    line = (f"both phases (tuning first, then the headline): {format_duration(total)} ({total:,.0f} s); still to run: "
            f"{format_duration(todo)}" + (f", about {format_duration(todo / jobs)} with {jobs} parallel jobs" if jobs > 1 else ""))
    reporter.message(line)
    return SuiteResult(suite.name, Path(results_root) / suite.name, [], plan="\n\n".join(plans + [line]))
