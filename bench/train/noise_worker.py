"""The noise of the coming steps, drawn in a process of its own (on a GPU: state.prefetch).

    python -m bench.train.noise_worker      (started by NoiseWorker; its requests come on stdin)

Why a process: the noise is most of a draw (3 x 128 x 128 normals per image at 128 px), and numpy
holds the interpreter lock while it builds each sample's generator; in a thread of the training
process that competes with the training thread, which holds the lock for its kernel launches. This
module imports numpy alone (bench.train.numbers, no torch): it starts in a fraction of a second.

The exchange: the parent maps a memory file of `slots` slots, each one step's noise for its samples,
and passes the file's descriptor. On stdin: a line of JSON (stream seed, samples, shape, slots,
descriptor), then a line "step slot" per request, in step order; the worker fills the slot with the
numbers Streams.noise draws (the same function, bit for bit) and answers "step slot" on stdout. It
ends at the end of its stdin: when the parent closes it, or exits (killed included: the kernel closes
the parent's end), so it never outlives its run.
"""

from __future__ import annotations

import collections
import json
import math
import mmap
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.train.numbers import fill_noise

COMMAND = (sys.executable, "-m", "bench.train.noise_worker")  # how a worker starts (a test swaps it)
STOP_SECONDS = 30.0  # a guard: a worker that has not ended this long after its stdin closed is killed


def _memory_file(size: int) -> int:
    """A descriptor of `size` bytes of memory that no name reaches (gone when both ends close it)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("diffbench-noise")
    else:  # no memfd (not Linux): an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


def _slots(memory, count: int, rows: int, shape: tuple, slots: int) -> list[np.ndarray]:
    """The memory's slots as float32 arrays [rows, *shape]."""
    return [np.frombuffer(memory, np.float32, count, 4 * count * i).reshape(rows, *shape) for i in range(slots)]


class NoiseWorker:
    """The training process's end: requests each step's noise `ahead` steps early, in step order, and
    takes it (a copy out of its slot). Raises OSError once the worker is gone; the caller then draws
    the noise itself (the same numbers)."""

    def __init__(self, stream_seed: int, samples: range, shape, steps: int, ahead: int):
        self.samples, self.shape, self.steps, self.ahead = samples, tuple(int(s) for s in shape), steps, ahead
        self.slots = ahead + 1  # in flight: the step being taken and the `ahead` after it
        self.count = len(samples) * math.prod(self.shape)
        self.sent = collections.deque()  # steps requested and not answered, consecutive
        fd = _memory_file(4 * self.count * self.slots)
        try:
            self.memory = mmap.mmap(fd, 4 * self.count * self.slots)
            root = str(Path(__file__).resolve().parents[2])  # where `bench` is, whatever the run's directory
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            self.proc = subprocess.Popen(COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,),
                                         env=env)
        finally:
            os.close(fd)  # the mapping and the worker hold it
        self.view = _slots(self.memory, self.count, len(samples), self.shape, self.slots)
        head = {"seed": int(stream_seed), "samples": [samples.start, samples.stop], "shape": self.shape,
                "slots": self.slots, "fd": fd}
        try:
            self._write(json.dumps(head).encode() + b"\n")
        except OSError:  # ended before its first line (a broken install): nothing is left behind
            self.close()
            raise

    def _write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _answer(self) -> int:
        """The next answer's slot (the oldest request's)."""
        line = self.proc.stdout.readline()  # blocks without the interpreter lock
        want = self.sent.popleft()
        try:
            step, slot = map(int, line.split())
        except ValueError:
            raise OSError(f"the noise worker ended (exit status {self.proc.poll()})") from None
        if step != want:
            raise OSError(f"the noise worker answered step {step} for step {want}")
        return slot

    def take(self, step: int) -> np.ndarray:
        """`step`'s noise [len(samples), *shape] (float32, a copy); the next `ahead` steps requested."""
        if step in self.sent:  # steps skipped since: answered and dropped
            while self.sent[0] != step:
                self._answer()
        else:  # another order (a resume): what is in flight is answered and dropped
            while self.sent:
                self._answer()
        first = self.sent[-1] + 1 if self.sent else step
        new = range(first, max(step, min(step + self.ahead, self.steps - 1)) + 1)
        if len(new):
            self._write(b"".join(b"%d %d\n" % (k, k % self.slots) for k in new))
            self.sent.extend(new)
        return self.view[self._answer()].copy()

    def close(self) -> None:
        """End the worker (its stdin closed: it stops at the end of what it reads) and free the memory."""
        try:
            self.proc.stdin.close()
        except OSError:  # already gone: the pipe is broken
            pass
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.view.clear()
        self.memory.close()


def serve(requests, answers) -> None:
    """The worker: the header, then fill and answer each request until the requests end."""
    head = json.loads(requests.readline())
    samples, shape, slots = range(*head["samples"]), tuple(head["shape"]), head["slots"]
    count = len(samples) * math.prod(shape)
    memory = mmap.mmap(head["fd"], 4 * count * slots)
    view = _slots(memory, count, len(samples), shape, slots)
    for line in requests:
        step, slot = map(int, line.split())
        fill_noise(view[slot], head["seed"], step, samples)
        answers.write(b"%d %d\n" % (step, slot))
        answers.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the run, whose end ends this worker
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the parent is gone: nothing to answer
        os._exit(0)


if __name__ == "__main__":
    main()
