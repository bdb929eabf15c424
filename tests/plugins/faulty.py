"""A test plugin: the baseline, unless the FAULTS environment variable (comma-separated
"<tag>:<kind>[@<step>]") names this instance's tag; then at that step (progress step / 8, the
tests' budget) it fails the chosen way: oom, error, kill (SIGKILL), interrupt (Ctrl-C) or
diverge (loss weights finite in float64 but infinite in the float32 loss). Read at every call, so worker processes and jobs see it too."""

import os
import signal

import torch

from bench.core.spec import Method, Param

ITERS = 8  # the runner tests' budget: progress p = step / 8


class Faulty(Method):
    """The baseline with a fault on demand (for tests)."""

    name = "faulty"
    slots = frozenset({"weighting"})
    params = {"tag": Param("a", "the name FAULTS uses for this run")}
    source = "tests"

    def loss_weights(self, t, p, schedule, target):
        kind, at = self._fault()
        # Only in training steps: describe() and method_trace.json ask for all T timesteps at once.
        if kind and len(t) < schedule.T and round(p * ITERS) + 1 >= at:
            if kind == "oom":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if kind == "error":
                raise ValueError("bad thing happened")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "interrupt":
                raise KeyboardInterrupt(f"faulty {self.hp['tag']}: interrupt at step {at}")
            if kind == "diverge":
                return torch.full(t.shape, 1e300, dtype=torch.float64)
        return torch.ones(t.shape, dtype=torch.float64)

    def _fault(self) -> tuple[str, int]:
        for item in filter(None, os.environ.get("FAULTS", "").split(",")):
            tag, _, what = item.partition(":")
            if tag == self.hp["tag"]:
                kind, _, at = what.partition("@")
                return kind, int(at or 1)
        return "", 0
