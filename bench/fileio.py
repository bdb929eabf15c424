"""Atomic file writes and JSON-lines logs.

Whole files (configs, statuses, checkpoints) are written to a temporary file in the same
folder and renamed over the target, so a reader never sees half a file. Logs are appended
line by line; a run that resumes first trims its logs back to its checkpoint's step, which
also drops a line cut short by a kill.
"""

import json
import math
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


#: DIFFBENCH_FAULT=<point>[@<k>]: the process kills itself (SIGKILL) the k-th time (default 1st) it
#: reaches <point>; the reliability tests use it to stop a run exactly there, with no clock involved.
FAULT = os.environ.get("DIFFBENCH_FAULT", "")
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named place where a test may kill this process (see FAULT); nothing otherwise."""
    if not FAULT or FAULT.split("@")[0] != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(FAULT.split("@")[1] if "@" in FAULT else 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files of atomic writes killed with their process (`.<name>.<random>.tmp`)."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """Write a file through `write(fileobj)` to a temporary name in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            fault_point(f"write:{path.name}")  # the bytes are out, the rename not done
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared like any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_folder(path, option: str) -> None:
    """Refuse, in one line, an output folder that cannot be made or written: a file in its place or
    on its path, no write permission, a read-only file system. Checked before anything is written."""
    from bench.errors import ConfigError

    path = Path(path)
    probe = path
    try:
        while not probe.exists():  # the nearest part of the path that exists decides
            if probe.parent == probe:
                break
            probe = probe.parent
    except PermissionError:
        raise ConfigError(f"{option} {path}: {probe.parent} cannot be searched by this user; pass another {option} "
                          "or fix its permissions") from None
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{option} {path}: {probe} is a file, not a folder; pass another {option}")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(probe) else "is not writable by this user"
        raise ConfigError(f"{option} {path}: {probe} {why}; pass another {option} or fix its permissions")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _clean(obj):
    """JSON has no NaN: store non-finite floats as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj) -> str:
    return json.dumps(_clean(obj), allow_nan=False)


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n").encode())


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a") as f:
        text = "".join(dumps(r) + "\n" for r in rows)
        if FAULT:  # a kill half-way through the rows: a line cut short
            f.write(text[:len(text) // 2])
            f.flush()
            fault_point(f"append:{Path(path).name}")
            text = text[len(text) // 2:]
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: Path):
    """Every complete row of a JSON-lines file, one at a time (constant memory; a torn last line
    is skipped; a missing file has no rows)."""
    if not Path(path).exists():
        return
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # torn or garbage: never data (callers that must know ask unreadable_lines)
                continue
            if isinstance(row, dict):
                yield row


def unreadable_lines(path: Path) -> tuple[list[int], int | None]:
    """(1-based numbers of the lines of a JSON-lines file that are not a JSON object, the number of the
    last line when it was cut short: no final newline, as a write killed half-way leaves it)."""
    if not Path(path).exists():
        return [], None
    bad, n, last = [], 0, b"\n"
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            last = line
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:  # JSONDecodeError, and bytes that are not UTF-8
                ok = False
            if not ok:
                bad.append(n)
    return bad, (n if n and not last.endswith(b"\n") else None)


def read_jsonl(path: Path) -> list[dict]:
    """Every complete row of a JSON-lines file (a torn last line is ignored)."""
    return list(iter_jsonl(path))


def trim_jsonl(path: Path, max_step: int) -> None:
    """Keep only rows with step <= max_step (atomically): what a resumed run will not redo."""
    if Path(path).exists():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
        atomic_write_bytes(path, "".join(dumps(r) + "\n" for r in rows).encode())
