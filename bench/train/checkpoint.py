"""checkpoint.pt: a run's whole state (state_dicts, every RNG state, the step, the clocks, and what the
method keeps: its state_dict and an aux_loss method's extra module),
written atomically by rank 0 and restored exactly (bit for bit on the CPU; on another device,
with that device's floating point). Loaded with weights_only: never a pickled module.

The last two are kept: checkpoint.pt and checkpoint.prev.pt, each with the run's identity inside
and its SHA-256 twice: sealed at the end of the file itself (after torch's zip, which torch.load
ignores), and in a checkpoint*.sha256 file. A resume takes the newest one that is whole (its seal
matches its bytes, and its digest is known where digest files are), readable and this run's; a bad
one is named, moved to checkpoint.rejected.pt, and the previous one used (the steps since are
redone). Deleting the digest files never turns the check off: the seal travels with the bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from bench import fileio
from bench.core.config import RUNTIME_KEYS
from bench.core.runtime import Runtime, broadcast, gather_objects, meet
from bench.errors import BenchError, CheckpointError, ConfigError
from bench.fileio import atomic_write
from bench.train.run_folder import config_diff
from bench.train.state import RunState

CHECKPOINT_FORMAT = 3  # 3: draws keyed by (seed, step, sample), no generator states; world_size since
                       # multi-process training (absent: 1)



def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to restart the run from scratch"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a diffbench checkpoint (format {CHECKPOINT_FORMAT}); delete it to restart")
    return ckpt


def _process_rng(rt: Runtime) -> dict:
    """This process's global RNG states (dropout draws from them)."""
    rng = {"cpu": torch.get_rng_state()}
    if rt.torch_device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(rt.torch_device)
    return rng


def save_checkpoint(state: RunState, path: Path) -> None:
    """checkpoint.pt, atomically: state_dicts, every RNG state, the step and the clocks. Every
    process calls it (each one's RNG state is saved); rank 0 writes, hashing the bytes as they go
    out (a 6.7 GB checkpoint is never read back). The other ranks wait for the write at a meeting of
    the rendezvous store, not inside the next step's all-reduce, and share its outcome: a write that
    fails raises the same CheckpointError on every rank."""
    rngs = gather_objects(_process_rng(state.rt))
    failure = None
    if state.rt.rank == 0:
        try:
            _write_checkpoint(state, path, rngs)
        except CheckpointError as exc:
            failure = str(exc)
        except Exception as exc:  # noqa: BLE001 -- told to the others, then raised here as it was
            if state.rt.world_size > 1:
                meet()
                broadcast(f"rank 0 failed writing {path}: {type(exc).__name__}: {str(exc)[:200]}")
            raise
    if state.rt.world_size > 1:
        meet()  # through the store: bounded by DIFFBENCH_WAIT_MIN, never by a collective's timeout
        failure = broadcast(failure)
    if failure:
        raise CheckpointError(failure)


def _write_checkpoint(state: RunState, path: Path, rngs: list) -> None:
    """Rank 0's part of save_checkpoint: the new file and its digest, then the rotation."""
    data = {"format": CHECKPOINT_FORMAT, "step": state.step, "world_size": state.rt.world_size,
            "model": state.model.state_dict(), "ema": state.ema.state_dict(), "opt": state.opt.state_dict(),
            "rng_torch": rngs[0]["cpu"], "rng_processes": rngs, "clocks": state.clocks,
            "method_state": state.method.state_dict(),  # what a method learned (feedback, tracked averages)
            "run": run_identity(state),  # whose checkpoint this is: a foreign one is refused on resume
            "sealed": True}  # its bytes end in their SHA-256: one found without it lost it
    if state.aux is not None:  # an aux_loss method's extra module
        data["aux"] = state.aux.module.state_dict()
    # A failed write (a full disk) leaves the previous checkpoint and no partial file behind; a write
    # killed with its process leaves its temporary file (fileio.atomic_write's name), removed here.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    following = path.with_name(NEXT)
    try:
        sealed = []  # the whole file's SHA-256, hashed as it is written (never read back)
        atomic_write(following, lambda f: sealed.append(_save_sealed(data, f)))
        digest = sealed[0]
        fileio.write_json(_digest_file(following), {"step": state.step, "sha256": digest})
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its zip writer
        following.unlink(missing_ok=True)
        free_mb = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointError(f"could not write {path} at step {state.step} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:100]}; {free_mb:.0f} MiB free there); the previous "
                              "checkpoint is kept: free space and run the same command again to resume") from None
    # Keep the last two, each with its own digest. The new digest is on disk before any rename, and
    # resume_latest accepts a digest from any checkpoint*.sha256: a kill between any two renames
    # leaves the newest whole checkpoint verifiable.
    previous = path.with_name(PREVIOUS)
    if path.exists():
        os.replace(path, previous)
        fileio.fault_point("checkpoint:rotated")
        if _digest_file(path).exists():
            os.replace(_digest_file(path), _digest_file(previous))
        else:  # resumed from it (a kill before its digest's rename, or a run from before digests): read once
            fileio.write_json(_digest_file(previous), {"sha256": sha256_file(previous)})
    os.replace(following, path)
    fileio.fault_point("checkpoint:renamed")
    os.replace(_digest_file(following), _digest_file(path))


NEXT, PREVIOUS, REJECTED = "checkpoint.next.pt", "checkpoint.prev.pt", "checkpoint.rejected.pt"

# The seal after torch's zip: this line and the SHA-256 of every byte before it, in hex. A zip is read
# from its end record backwards, so torch.load (and unzip) skip what follows it.
SEAL = b"\ndiffbench-checkpoint-sha256 "
SEAL_BYTES = len(SEAL) + 64 + 1
_ZIP_END = b"PK\x05\x06"  # a zip's end record (22 bytes, no comment: torch.save's): the file's last bytes


class _SealingWriter:
    """torch.save's file object: hashes every byte on its way out, then seals the file with that hash."""

    def __init__(self, f):
        self._f, self._sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self._sha.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def seal(self) -> str:
        """Append the seal; return the SHA-256 of the whole file, seal included (its digest file's)."""
        tail = SEAL + self._sha.hexdigest().encode() + b"\n"
        self.write(tail)
        return self._sha.hexdigest()


def _save_sealed(data: dict, f) -> str:
    """torch.save(data) into `f`, sealed; the SHA-256 of all that was written."""
    out = _SealingWriter(f)
    torch.save(data, out)
    return out.seal()


def check_seal(path: Path) -> tuple[bool | None, str]:
    """(whether the checkpoint's bytes match the SHA-256 sealed at its end, None: no seal, the plain
    zip a checkpoint from before seals is; the whole file's SHA-256), in one read of the file."""
    size = Path(path).stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = max(0, size - SEAL_BYTES)
        while left > 0 and (block := f.read(min(1 << 20, left))):
            h.update(block)
            left -= len(block)
        tail = f.read()
    carried, whole = h.hexdigest(), h.copy()
    whole.update(tail)
    if tail.startswith(SEAL) and len(tail) == SEAL_BYTES:
        return tail[len(SEAL):-1] == carried.encode() and tail.endswith(b"\n"), whole.hexdigest()
    return (None if tail[-22:].startswith(_ZIP_END) else False), whole.hexdigest()


def _digest_file(path: Path) -> Path:
    return path.with_suffix(".sha256")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resume_latest(state: RunState, out: Path) -> Path | None:
    """Resume from the newest good checkpoint in `out` (None: there is none, a fresh start). A bad
    checkpoint.pt is named on stderr, moved aside, and the previous one used; with no good one left,
    one CheckpointError line names what is wrong. Rank 0 decides and the other processes resume
    from its choice (it alone moves files)."""
    out = Path(out)
    if state.rt.world_size > 1:
        chosen = None
        if state.rt.rank == 0:
            try:
                chosen = _resume_newest_good(state, out)
                chosen = ("ok", chosen.name if chosen else None)
            except BenchError as exc:  # every process raises it: none waits for the others in vain
                chosen = (type(exc).__name__, str(exc))
        kind, value = broadcast(chosen)
        if kind != "ok":
            raise (ConfigError if kind == "ConfigError" else CheckpointError)(value)
        if state.rt.rank > 0 and value:
            resume(state, out / value)
        return out / value if value else None
    return _resume_newest_good(state, out)


def _resume_newest_good(state: RunState, out: Path) -> Path | None:
    digests = set()
    for sidecar in out.glob("checkpoint*.sha256"):
        try:
            digests.add(fileio.read_json(sidecar)["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    verified = bool(list(out.glob("checkpoint*.sha256")))  # none: the seals alone (before seals and digests: none)
    problems = []
    for path in (out / "checkpoint.pt", out / PREVIOUS):
        if not path.exists():
            continue
        try:
            sealed, digest = check_seal(path)
            if sealed is False:  # the seal, which no digest file's removal switches off
                raise CheckpointError(f"checkpoint {path} is damaged (cut or altered: its bytes do not match the "
                                      "SHA-256 sealed at its end)")
            if verified and digest not in digests:
                raise CheckpointError(f"checkpoint {path} is altered or was never completed (its SHA-256 is not the "
                                      "one recorded)")
            resume(state, path, sealed=bool(sealed))
        except CheckpointError as exc:
            problems.append(str(exc))
            if path.name == "checkpoint.pt" and (out / PREVIOUS).exists():
                os.replace(path, out / REJECTED)  # kept for a look; the next checkpoint is written afresh
                _digest_file(path).unlink(missing_ok=True)  # the digest of what it should have been
                print(f"warning: {exc}; moved to {REJECTED}, resuming from {PREVIOUS}", file=sys.stderr)
            continue
        return path
    if problems:
        raise CheckpointError("; and ".join(problems) + "; no good checkpoint is left: delete it to restart the run "
                              "from scratch (or put back a good copy)")
    return None


def run_identity(state: RunState) -> dict:
    """What makes a run this run (its config without how it executes), saved in its checkpoints."""
    return {k: v for k, v in json.loads(fileio.dumps(state.cfg.to_dict())).items() if k not in RUNTIME_KEYS}


def _use_optimizer_kernel(opt: torch.optim.Optimizer, fused: bool) -> None:
    """AdamW's kernel as this process's runtime says (load_state_dict brings back the saved run's:
    fused from a GPU, foreach from a CPU); the fused kernel keeps its step counts on the device."""
    for group in opt.param_groups:
        group["fused"], group["foreach"] = (True, None) if fused else (None, True)
        for p in group["params"]:
            st = opt.state.get(p)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(p.device if fused else "cpu", torch.float32)


def resume(state: RunState, path: Path, sealed: bool | None = None) -> None:
    """Restore a run from its checkpoint, so it goes on bit-for-bit as if never stopped (on the
    CPU; a checkpoint also resumes on another device, with that device's floating point).
    sealed=False: its file was found without a seal (check_seal), which one written sealed has lost."""
    ckpt = load_checkpoint(path)
    if sealed is False and ckpt.get("sealed"):
        raise CheckpointError(f"checkpoint {path} is damaged (it was written with a SHA-256 sealed at its end, and "
                              "that seal is gone)")
    saved = int(ckpt.get("world_size", 1))
    if saved != state.rt.world_size:  # the launch is wrong, not the checkpoint: never a reason to set it aside
        raise ConfigError(
            f"checkpoint {path} was written by {saved} process(es) (gpus={saved}) and this run has "
            f"{state.rt.world_size}: resume it with gpus = {saved}"
            + (f" (torchrun --nproc_per_node {saved})" if saved > 1 else " (one process, no torchrun)")
            + ", or delete the run folder to restart")
    if "run" in ckpt:  # checkpoints from before identities were saved resume as they always did
        changed = [k for k in config_diff(ckpt["run"], run_identity(state)) if k != "gpus"]  # said above
        if changed:
            raise CheckpointError(f"checkpoint {path} belongs to another run (it differs in {', '.join(changed[:4])}); "
                                  "put back this run's checkpoint, or delete it to restart the run")
    try:
        state.model.load_state_dict(ckpt["model"])
        state.ema.load_state_dict(ckpt["ema"])
        state.opt.load_state_dict(ckpt["opt"])
        if state.aux is not None:
            state.aux.module.load_state_dict(ckpt["aux"])
        state.method.load_state_dict(ckpt.get("method_state") or {})
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({str(exc)[:120]}); delete it to restart") from None
    _use_optimizer_kernel(state.opt, state.rt.fused_adamw)
    rng = ckpt.get("rng_processes", [{"cpu": ckpt["rng_torch"]}])[state.rt.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and state.rt.torch_device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], state.rt.torch_device)
    state.step, state.clocks = int(ckpt["step"]), dict(ckpt["clocks"])
    state.prefetched.clear()  # samples drawn ahead for other steps
