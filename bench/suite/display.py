"""What a suite run shows: events of runs to a live rich display, plain lines or a callback, and
the summary table at the end. (Runs in other processes reach it through bench.suite.poller.)
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from bench.suite.cost import format_duration
from bench.suite.grid import RunSpec, Suite
from bench.terminal import progress_bar
from bench.train.run_folder import RunOutcome, SuiteResult


class Reporter:
    """Receives the runner's events; the base class ignores them all."""

    def suite_start(self, suite: Suite, todo: list[RunSpec], total: int) -> None: ...
    def run_start(self, run: RunSpec) -> None: ...
    def run_step(self, run: RunSpec, step: int, iters: int) -> None: ...
    def run_eval(self, run: RunSpec, step: int, rows: list[dict], evaluating: bool = False) -> None: ...
    def run_end(self, run: RunSpec, outcome: RunOutcome) -> None: ...
    def message(self, text: str) -> None: ...
    def suite_end(self, result: SuiteResult) -> None: ...


class CallbackReporter(Reporter):
    """Calls fn(event_dict) for every event (for tools and tests)."""

    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def suite_start(self, suite, todo, total):
        self.fn({"event": "suite_start", "suite": suite.name, "todo": [r.key for r in todo], "total": total})

    def run_start(self, run):
        self.fn({"event": "run_start", "run": run.key})

    def run_step(self, run, step, iters):
        self.fn({"event": "step", "run": run.key, "step": step, "iters": iters})

    def run_eval(self, run, step, rows, evaluating=False):
        self.fn({"event": "evaluating" if evaluating else "eval", "run": run.key, "step": step, "rows": rows})

    def run_end(self, run, outcome):
        self.fn({"event": "run_end", "run": run.key, **outcome.as_dict()})

    def message(self, text):
        self.fn({"event": "message", "text": text})

    def suite_end(self, result):
        self.fn({"event": "suite_end", "suite": result.suite, "outcomes": [o.as_dict() for o in result.outcomes]})


def escape(text: str) -> str:
    """Text shown through rich, with its markup characters escaped."""
    from rich.markup import escape as _escape

    return _escape(str(text))


def _fmt_eval(rows: list[dict]) -> str:
    return ", ".join(f"{r.get('metric')}={r.get('value'):.4g}" for r in rows
                     if isinstance(r.get("value"), (int, float)))


class RichReporter(Reporter):
    """A live rich display: the suite's runs, each running run's iterations and its last evaluation;
    then a summary table. Without a terminal it prints one line per event instead."""

    def __init__(self, console=None, live: bool | None = None):
        from rich.console import Console

        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.progress = None
        self.tasks: dict[str, int] = {}
        self.suite_task = None
        self.metric = None
        self.lock = threading.Lock()
        self._last_line: dict[str, float] = {}

    def suite_start(self, suite, todo, total):
        self.metric = suite.report.get("metric")
        self.console.print(f"[bold]suite {suite.name}[/bold]: {total} runs, {total - len(todo)} already finished, "
                           f"{len(todo)} to run")
        if self.live and todo:
            self.progress = progress_bar(self.console)
            self.progress.start()
            self.suite_task = self.progress.add_task(f"suite {suite.name}", total=len(todo))

    def run_start(self, run):
        with self.lock:
            if self.progress:
                self.tasks[run.key] = self.progress.add_task(f"  {escape(run.key)}", total=run.config["iters"])
            else:
                self.console.print(f"start {escape(run.key)}")

    def run_step(self, run, step, iters):
        with self.lock:
            if self.progress and run.key in self.tasks:
                self.progress.update(self.tasks[run.key], completed=step)
            elif not self.progress:
                now = time.time()
                if now - self._last_line.get(run.key, 0) > 30:
                    self._last_line[run.key] = now
                    self.console.print(f"  {escape(run.key)}: step {step}/{iters}")

    def run_eval(self, run, step, rows, evaluating=False):
        with self.lock:
            text = escape(f"evaluating at step {step}..." if evaluating else f"eval @ {step}: {_fmt_eval(rows)}")
            if self.progress and run.key in self.tasks:
                self.progress.update(self.tasks[run.key], description=f"  {escape(run.key)}  [dim]{text}[/dim]")
            elif not self.progress and not evaluating:
                self.console.print(f"  {escape(run.key)}: {text}")

    def run_end(self, run, outcome):
        with self.lock:
            if self.progress:
                task = self.tasks.pop(run.key, None)
                if task is not None:
                    self.progress.remove_task(task)
                self.progress.advance(self.suite_task)
            colour = {"done": "green", "failed": "red"}.get(outcome.state, "yellow")
            extra = f": {escape(outcome.reason)}" if outcome.state == "failed" and outcome.reason else ""
            self.console.print(f"[{colour}]{outcome.state}[/{colour}] {escape(run.key)} ({outcome.action}, "
                               f"{format_duration(outcome.seconds)}){extra}")

    def message(self, text):
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def suite_end(self, result):
        if self.progress:
            self.progress.stop()
            self.progress = None
        if result.plan:
            return
        self.console.print(summary_table(result, self.metric))


def summary_table(result: SuiteResult, metric: str | None = None):
    """A rich table of every run: state, last step, final metric, time, and the reason of a failure."""
    from rich.table import Table

    metrics = [metric] if metric else sorted({m for o in result.outcomes for m in o.final})
    workloads = sorted({o.key.split("/")[0] for o in result.outcomes})
    title = (f"suite {result.suite}: {len(result.by_state('done'))}/{len(result.outcomes)} done, "
             f"{len(result.by_state('failed'))} failed")
    if len(workloads) == 1:
        title += f" ({workloads[0]})"
    table = Table(title=title, caption=f"results in {result.suite_dir}")
    if len(workloads) > 1:
        table.add_column("workload", no_wrap=True)
    table.add_column("method", no_wrap=True)
    for col in ("seed", "state", "step", *metrics, "time"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    table.add_column("note", ratio=1, overflow="fold")
    for o in result.outcomes:
        workload, label, seed = o.key.split("/")
        colour = {"done": "green", "failed": "red"}.get(o.state, "yellow")
        vals = [f"{o.final[m]:.4g}" if isinstance(o.final.get(m), (int, float)) else "-" for m in metrics]
        note = escape(o.reason or ("" if o.action in ("ran", "resumed") else o.action))
        if o.action == "resumed":
            note = ("resumed; " + note).strip("; ")
        cells = [workload] if len(workloads) > 1 else []
        cells += [label, seed.removeprefix("seed"), f"[{colour}]{o.state}[/{colour}]",
                  "-" if o.step is None else str(o.step), *vals,
                  format_duration(o.seconds) if o.seconds else "-", note]
        table.add_row(*cells)
    return table


def make_reporter(progress) -> Reporter:
    if isinstance(progress, Reporter):
        return progress
    if progress is False:
        return Reporter()
    if callable(progress):
        return CallbackReporter(progress)
    return RichReporter(live=None if progress is None else bool(progress))
