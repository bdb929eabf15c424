"""Following runs that execute in other processes (worker processes, Slurm jobs) through the files
they write: a thread that polls each run folder and forwards progress to the suite's reporter."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from bench.suite.grid import RunSpec
from bench.train.run_folder import last_step


class FilePoller:
    """Follows runs that execute elsewhere (worker processes, Slurm jobs) through their files:
    the last step in status.json / steps.jsonl, new rows of evals.jsonl."""

    def __init__(self, reporter, interval: float = 1.0):
        self.reporter, self.interval = reporter, interval
        self.active: dict[str, tuple[RunSpec, Path]] = {}
        self.eval_offsets: dict[str, int] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(timeout=5)

    def add(self, run: RunSpec, run_dir: Path):
        with self.lock:
            self.active[run.key] = (run, run_dir)
            p = run_dir / "evals.jsonl"
            self.eval_offsets[run.key] = p.stat().st_size if p.exists() else 0

    def remove(self, run: RunSpec):
        with self.lock:
            self.active.pop(run.key, None)

    def poll(self):
        with self.lock:
            items = list(self.active.values())
        for run, run_dir in items:
            try:
                self.reporter.run_step(run, last_step(run_dir), run.config["iters"])
                p = run_dir / "evals.jsonl"
                if p.exists():
                    off = self.eval_offsets.get(run.key, 0)
                    with open(p, "rb") as f:
                        f.seek(off)
                        data = f.read()
                    end = data.rfind(b"\n") + 1
                    if end:
                        rows = [json.loads(x) for x in data[:end].splitlines() if x.strip()]
                        self.eval_offsets[run.key] = off + end
                        if rows:
                            self.reporter.run_eval(run, rows[-1].get("step", 0), rows)
            except (OSError, json.JSONDecodeError, ValueError):
                continue

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.poll()
