"""Optional live logging of a run to TensorBoard or Weights & Biases, beside its files.

`--log tensorboard|wandb` (before or after the command: `diffbench run smoke --log tensorboard`) or a suite's
`[log] to = "..."` sets DIFFBENCH_LOG, which every process of the run inherits (workers, torchrun,
Slurm jobs). Rank 0 then logs, under the run's results folder name <workload>/<label>/seed<k>:
the training scalars of steps.jsonl, every evaluation's metrics, and at each evaluation a grid of
its saved samples (with `save_samples`). TensorBoard writes <run>/tensorboard/ (`tensorboard
--logdir results/<suite>` shows every run); W&B runs offline unless WANDB_MODE says otherwise, in
<run>/wandb/, with the resolved run record as its config. Both are optional extras:
`pip install -e '.[tensorboard]'`, `'.[wandb]'`. Logging changes nothing a run computes or writes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from bench.errors import ConfigError

LOG_ENV = "DIFFBENCH_LOG"
LOGGERS = ("tensorboard", "wandb")
#: steps.jsonl fields shown as training scalars
SCALARS = ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "lr_scale", "beta1", "grad_norm", "ema_decay",
           "images_per_s")


def check_logger(kind: str, named: str = "--log") -> None:
    """One ConfigError line when `kind` is unknown or its package is not installed here."""
    unset = "" if named == "--log" else f", or unset {named}"
    if kind not in LOGGERS:
        raise ConfigError(f"unknown {named} {kind!r}; use one of {', '.join(LOGGERS)}{unset}")
    if importlib.util.find_spec(kind) is None:
        raise ConfigError(f"{named} {kind} needs the {kind} package, which is not installed: "
                          f"pip install -e '.[{kind}]'{unset}")


def check_log_env() -> None:
    """DIFFBENCH_LOG, which may come from the shell rather than --log, checked before a run writes anything."""
    if os.environ.get(LOG_ENV):
        check_logger(os.environ[LOG_ENV], named=LOG_ENV)


def samples_grid(path: Path, n: int = 16) -> np.ndarray | None:
    """The first n saved samples of an evaluation as one uint8 image [H', W', C] (rows of 8), or None."""
    if not path.is_file():
        return None
    with np.load(path) as z:
        images = z["arr_0"][:n]
    if not len(images):
        return None
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    h, w, c = images.shape[1:]
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    return grid


class LiveLog:
    """TrainEvents that also log to TensorBoard or W&B, then pass every event on to `inner`."""

    def __init__(self, kind: str, out: Path, record: dict, inner, start_step: int):
        check_logger(kind)
        self.kind, self.out, self.inner = kind, Path(out), inner
        self.name = "/".join(self.out.resolve().parts[-3:])  # <workload>/<label>/seed<k>
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops what was logged past its checkpoint (steps > start_step, and
            # everything of an attempt killed before its first checkpoint), as its files do
            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=start_step + 1)
        else:
            import wandb

            # One W&B run per folder. W&B keeps steps in the order logged: the steps a resumed run redoes
            # after its checkpoint are logged again and W&B keeps its first values of them.
            run_id = hashlib.sha1(str(self.out.resolve()).encode()).hexdigest()[:16]
            self.writer = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(self.out), name=self.name,
                                     id=run_id, resume="allow", config=record)

    def _scalars(self, values: dict, step: int) -> None:
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        else:
            self.writer.log(values, step=step)

    def on_step(self, step: int, iters: int, row: dict) -> None:
        self._scalars({f"train/{k}": float(row[k]) for k in SCALARS if isinstance(row.get(k), (int, float))}, step)
        if self.inner is not None:
            self.inner.on_step(step, iters, row)

    def on_eval(self, step: int, rows: list[dict]) -> None:
        self._scalars({f"eval/{r['metric']}": float(r["value"]) for r in rows if r.get("value") is not None}, step)
        grid = samples_grid(self.out / "samples" / f"step{int(step):08d}.npz")
        if grid is not None:
            if self.kind == "tensorboard":
                self.writer.add_image("samples", grid, step, dataformats="HWC")
            else:
                import wandb

                self.writer.log({"samples": wandb.Image(grid)}, step=step)
        if self.kind == "tensorboard":
            self.writer.flush()
        if self.inner is not None:
            self.inner.on_eval(step, rows)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


def live_log(out: Path, record: dict, inner, start_step: int):
    """`inner` wrapped in a LiveLog when DIFFBENCH_LOG names a logger, else `inner` as it is."""
    kind = os.environ.get(LOG_ENV)
    return LiveLog(kind, out, record, inner, start_step) if kind else inner


def close_live_log(events) -> None:
    """Close `events` if it is a LiveLog (after the run's last evaluation)."""
    if isinstance(events, LiveLog):
        events.close()
