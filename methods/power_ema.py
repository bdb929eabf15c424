from pathlib import Path

import numpy as np
import torch

from bench.core.spec import Method, Param


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power-function EMA of relative width sigma_rel: the largest real root of
    sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1 (EDM2, Karras et al. 2024)."""
    a = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - a, 12.0 - a])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(gamma: float, step: int) -> float:
    """EDM2's decay of update `step` (1-based): (1 - 1 / step)^(gamma + 1); 0 at the first update."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


MAX_PROFILE = 100_000  # longer runs: profiles summed over blocks of steps (memory and time stay bounded)


def profile(gamma: float, step: int, length: int) -> np.ndarray:
    """Weights of the parameters after updates 1..length in a power EMA of exponent gamma read after
    update `step` (zero after `step`): (1 - beta_k) prod_{j = k+1..step} beta_j, exact for the discrete
    updates (EDM2's reconstruction integrates the continuous power function instead). beta_k =
    (1 - 1/k)^(gamma + 1), so the product is ((k / step))^(gamma + 1) in closed form."""
    k = np.arange(1, step + 1, dtype=np.float64)
    w = np.zeros(length)
    w[:step] = (1.0 - (1.0 - 1.0 / k) ** (gamma + 1.0)) * (k / step) ** (gamma + 1.0)
    return w


def blocked(w: np.ndarray, block: int) -> np.ndarray:
    """The profile summed over consecutive blocks of `block` updates (treating the parameters as constant
    within a block, as a continuous-time reconstruction does)."""
    pad = (-len(w)) % block
    return np.pad(w, (0, pad)).reshape(-1, block).sum(axis=1)


class PowerEMA(Method):
    """EDM2's power-function EMA (Karras et al. 2024; NVlabs/edm2 ``training/phema.py``,
    ``reconstruct_phema.py``).

    The evaluated average: beta_t = (1 - 1/t)^(gamma + 1) at update t, gamma from sigma_rel by
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (0.05 -> 16.97, 0.10 -> 6.94). It has its
    own warm-up (beta_1 = 0), so the harness's EMA warm-up does not apply, and the configured decay is
    not used. Post-hoc EMA: with snapshot_every > 0 the method also tracks the averages `tracked` and saves
    them every snapshot_every updates (ema_snapshots/); :func:`reconstruct` combines the snapshots by
    least squares into an average of any sigma_rel (< 0.289) at any saved step, the coefficients then
    rescaled to sum to 1 as EDM2's solve_posthoc_coefficients does (``coefficients(..., rescale=False)``:
    the raw least-squares weights, the suite's former reading).

    The suite's choice: the profiles are the exact discrete update weights (EDM2 uses the continuous
    power function, which matches them for long runs)."""

    name = "power_ema"
    slots = frozenset({"ema"})
    ema_warmup = False
    source = "Karras et al. 2024 (EDM2), training/phema.py and reconstruct_phema.py"
    params = {
        "sigma_rel": Param(0.10, "relative width of the evaluated average", low=0.0, high=0.28, low_open=True),
        "tracked": Param("0.05,0.10", "relative widths tracked for post-hoc reconstruction, comma-separated"),
        "snapshot_every": Param(0, "updates between snapshots of the tracked averages (0: none tracked)", low=0),
    }

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.gamma = sigma_rel_to_gamma(self.hp["sigma_rel"])
        self.tracked = [float(s) for s in self.hp["tracked"].split(",") if s.strip()]
        self.averages: list[dict[str, torch.Tensor]] = []  # one name -> tensor dict per tracked width

    def validate(self):
        from bench.errors import HyperparameterError  # reason: only these refusals need it

        try:
            widths = [float(s) for s in self.hp["tracked"].split(",") if s.strip()]
        except ValueError:
            widths = [-1.0]
        if not widths or not all(0 < s < 0.289 for s in widths):
            raise HyperparameterError(f"method 'power_ema': tracked={self.hp['tracked']!r} must list relative widths "
                                      "in (0, 0.289) joined by ',', e.g. 0.05,0.10")

    def ema_decay(self, p, base, step):
        return power_beta(self.gamma, max(1, step))

    def track_ema(self, step, model):
        if not self.hp["snapshot_every"]:
            return
        params = dict(model.named_parameters())
        if not self.averages:
            self.averages = [{k: v.detach().clone() for k, v in params.items()} for _ in self.tracked]
        with torch.no_grad():
            for sigma, avg in zip(self.tracked, self.averages):
                beta = power_beta(sigma_rel_to_gamma(sigma), step)
                for k, v in params.items():
                    if avg[k].device != v.device:  # restored from a checkpoint, which loads on the CPU
                        avg[k] = avg[k].to(v.device)
                    avg[k].lerp_(v.detach(), 1.0 - beta)

    def ema_snapshot(self, step):
        every = self.hp["snapshot_every"]
        if not every or step % every:
            return None
        return {"sigma_rels": list(self.tracked), "averages": [{k: v.clone() for k, v in a.items()} for a in self.averages]}

    def state_dict(self):
        return {"averages": self.averages} if self.averages else {}

    def load_state_dict(self, state):
        self.averages = [{k: v.clone() for k, v in a.items()} for a in state.get("averages", [])]


#: how the post-hoc coefficients are made (kept in each ema_posthoc record: one made otherwise is rebuilt)
COEFFICIENT_RULE = "least squares on the discrete profiles, rescaled to sum to 1 (EDM2)"


def coefficients(snapshots: list[tuple[int, float]], sigma_rel: float, step: int, rescale: bool = True) -> np.ndarray:
    """Least-squares weights of the snapshots (each (step, sigma_rel) of a tracked average) whose
    combination's profile is closest to a power EMA of `sigma_rel` read at `step` (EDM2's
    solve_posthoc_coefficients, on the discrete profiles), then divided by their sum as EDM2 does
    (``X / np.sum(X, axis=0)``): a combination of averages of a constant parameter is that constant.
    rescale=False keeps the raw least-squares weights (the suite's former reading; from 0.05 and 0.10
    snapshots every 25 of 300 updates they sum to 0.9986 for 0.15 and 0.993 for 0.2: a constant comes back
    that far off)."""
    length = max([step] + [s for s, _ in snapshots])
    block = -(-length // MAX_PROFILE)  # 1 (exact) up to MAX_PROFILE updates
    A = np.stack([blocked(profile(sigma_rel_to_gamma(sr), s, length), block) for s, sr in snapshots], axis=1)
    b = blocked(profile(sigma_rel_to_gamma(sigma_rel), step, length), block)
    c = np.linalg.lstsq(A, b, rcond=None)[0]
    return c / c.sum() if rescale else c


def snapshot_files(run_dir) -> list[Path]:
    """The run's snapshot files in step order (bench/train/extras.py writes them)."""
    from bench.train.extras import SNAPSHOT_DIR  # reason: the folder's name has one home

    return sorted((Path(run_dir) / SNAPSHOT_DIR).glob("*.pt"))


def _snapshot_problem(snap, path: Path, first: dict | None) -> str | None:
    """What is wrong with a loaded snapshot, or None: the step inside must be the one its file is named
    for (a file swapped for another step's), and its widths and tensors those of the run's first."""
    if not (isinstance(snap, dict) and isinstance(snap.get("step"), int) and isinstance(snap.get("averages"), list)
            and isinstance(snap.get("sigma_rels"), list) and len(snap["sigma_rels"]) == len(snap["averages"])):
        return "is not an EMA snapshot (step, sigma_rels, averages)"
    if not path.stem.isdigit() or int(path.stem) != snap["step"]:
        return f"holds step {snap['step']}, not the step its name says (a snapshot renamed or copied here)"

    def layout(s):
        return [float(sr) for sr in s["sigma_rels"]], [{k: tuple(v.shape) for k, v in a.items()} for a in s["averages"]]

    if first is not None and layout(snap) != layout(first):
        return f"tracks other widths or tensors than {first['step']:08d}.pt (a snapshot of another run)"
    return None


def load_snapshots(run_dir) -> list[dict]:
    """The run's snapshots in step order, each checked (:func:`_snapshot_problem`); a damaged or foreign
    one is a one-line ConfigError naming its file."""
    from bench.errors import ConfigError  # reason: only the refusals need it

    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir} does not exist or is not a folder: pass the folder of a power_ema run")
    snaps = []
    for f in snapshot_files(run_dir):
        try:
            snap = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # cut short or not a torch file: whatever the reader raises
            raise ConfigError(f"snapshot {f} is unreadable ({type(exc).__name__}: cut short or damaged); delete it to "
                              "reconstruct from the other snapshots") from None
        problem = _snapshot_problem(snap, f, snaps[0] if snaps else None)
        if problem:
            raise ConfigError(f"snapshot {f} {problem}; delete it to reconstruct from the other snapshots")
        snaps.append(snap)
    if not snaps:
        raise ConfigError(f"{run_dir} has no ema_snapshots/: train power_ema with snapshot_every > 0")
    return snaps


def reconstruct(run_dir, sigma_rel: float, step: int | None = None, snaps: list[dict] | None = None,
                rescale: bool = True) -> dict[str, torch.Tensor]:
    """The parameters of a power EMA of `sigma_rel` at `step` (default: the last snapshot's), combined
    from the snapshots in <run_dir>/ema_snapshots up to that step (or from `snaps`, already loaded), with
    :func:`coefficients` (`rescale` as there)."""
    from bench.errors import ConfigError  # reason: only the refusals need it

    snaps = load_snapshots(run_dir) if snaps is None else snaps
    saved = [s["step"] for s in snaps]
    step = saved[-1] if step is None else int(step)
    if step not in saved:  # later updates are in no snapshot: the average could not be formed
        raise ConfigError(f"step {step} has no snapshot in {run_dir}/ema_snapshots; use one of "
                          f"{', '.join(map(str, saved))}")
    items = [(s["step"], sr, avg) for s in snaps if s["step"] <= step for sr, avg in zip(s["sigma_rels"], s["averages"])]
    c = coefficients([(st, sr) for st, sr, _ in items], sigma_rel, step, rescale)
    return {k: sum(float(ci) * avg[k].double() for ci, (_, _, avg) in zip(c, items)).float() for k in items[0][2]}


def _sources(run_dir: Path, step: int) -> dict[str, str]:
    """SHA-256 of each snapshot a reconstruction at `step` reads: what an ema_posthoc file was built from."""
    import hashlib

    out = {}
    for f in snapshot_files(run_dir):
        if not f.stem.isdigit() or int(f.stem) <= step:
            with open(f, "rb") as fh:
                out[f.name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def write_reconstruction(run_dir, sigma_rel: float, step: int | None = None) -> Path:
    """`run_bench.py posthoc-ema`: the EMA of `sigma_rel` at `step` as a model state_dict (buffers from the
    run's checkpointed EMA) in <run_dir>/ema_posthoc/, beside a record of the snapshots it was built from
    (their SHA-256): an existing file is kept while they are unchanged, and rebuilt when one changed."""
    import sys

    from bench.errors import ConfigError  # reason: only the command writes and refuses
    from bench.fileio import atomic_write, read_json, write_json
    from bench.train.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} does not exist or is not a folder: pass the folder of a power_ema run")
    step = step or max((int(p.stem) for p in snapshot_files(run_dir) if p.stem.isdigit()), default=0)
    out = run_dir / "ema_posthoc" / f"sigma{sigma_rel:g}-step{step:08d}.pt"
    record, sources = out.with_suffix(".json"), _sources(run_dir, step)
    built_from = None
    if out.exists():
        try:
            made = read_json(record)
            built_from = made["snapshots"] if made.get("coefficients") == COEFFICIENT_RULE else "rule"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            built_from = {}  # no record (a file of an older version, or a build killed before it): rebuild
        if built_from == sources:  # made before from these very snapshots
            return out
    snaps = load_snapshots(run_dir)  # every snapshot checked before any is used
    params = reconstruct(run_dir, sigma_rel, step or None, snaps)  # none at `step`: one error line
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"{run_dir} has no checkpoint.pt (the EMA's buffers come from it); is it a run folder?")
    saved = load_checkpoint(run_dir / "checkpoint.pt")["ema"]
    bad = [k for k, v in params.items() if k not in saved or saved[k].shape != v.shape]
    if bad:
        raise ConfigError(f"the snapshots in {run_dir}/ema_snapshots hold {bad[0]!r}, which this run's network does "
                          "not have in that shape: snapshots of another run")
    if built_from is not None:  # said once the new one is ready, so a refusal stays the only line
        why = ("has no record of its snapshots" if not built_from else "was made by an older rule (coefficients "
               "not rescaled to sum to 1)" if built_from == "rule" else "was built from snapshots that changed since")
        print(f"posthoc-ema: {out} {why}; rebuilding it", file=sys.stderr)
    atomic_write(out, lambda f: torch.save({**saved, **params}, f))
    write_json(record, {"sigma_rel": sigma_rel, "step": step, "coefficients": COEFFICIENT_RULE,  # after: a kill
                        "snapshots": sources})  # between rebuilds
    return out
