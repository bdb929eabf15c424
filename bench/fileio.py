"""Atomic file writes, JSON-lines logs and locks.

Whole files (configs, statuses, checkpoints) are written to a temporary file in the same
folder and renamed over the target, so a reader never sees half a file. Logs are appended
line by line; a run that resumes first trims its logs back to its checkpoint's step, which
also drops a line cut short by a kill.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
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


class HashingWriter:
    """A binary file whose every written byte also goes to a SHA-256: the digest of a large file (a
    checkpoint) as it is streamed out, never read back. Write-only and sequential, as torch.save's
    zip writer is."""

    def __init__(self, f):
        self._f, self._sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self._sha.update(data)  # hashlib lets go of the GIL for large buffers
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def atomic_write(path: Path, write, sha256: bool = False) -> str | None:
    """Write a file through `write(fileobj)` to a temporary name in the same folder, then rename.
    With sha256, the file object hashes what is written, and its SHA-256 is returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    digest = None
    try:
        with os.fdopen(fd, "wb") as f:
            if sha256:
                hashing = HashingWriter(f)
                write(hashing)
                digest = hashing.hexdigest()
            else:
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
    return digest


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


# -- locks --------------------------------------------------------------------------------------------
#
# flock where the file system grants it: the kernel drops it when its process dies, whatever the
# cause. Some shared file systems refuse flock itself (Lustre mounted without `-o flock`, some NFS
# set-ups: ENOLCK, EOPNOTSUPP, EINVAL, ENOSYS); there an O_CREAT|O_EXCL owner file, atomic on any
# POSIX file system, takes its place. It names its holder (host, pid, boot id, the pid's start time),
# so a lock left by a process that died on this host is recognised and broken; one left on another
# host stays until that file is removed (the refusal names it).

_FLOCK_REFUSED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}
_told_no_flock: set[str] = set()


class HeldLock:
    """An exclusive lock this process holds; close() releases it (so does the process's end, for
    flock; an owner file is recognised as stale once its pid is gone)."""

    def __init__(self, path: Path, handle=None, owner_file: Path | None = None, owner: dict | None = None):
        self.path, self._handle, self._owner_file, self._owner = path, handle, owner_file, owner

    @property
    def kind(self) -> str:
        return "flock" if self._owner_file is None else "owner file"

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._owner_file is not None:
            if _read_owner(self._owner_file) == self._owner:  # still ours (never remove another's)
                self._owner_file.unlink(missing_ok=True)
            self._owner_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def owner_file_of(path: Path) -> Path:
    """The O_EXCL lock file that stands for `path` where flock is refused."""
    return Path(path).with_name(Path(path).name + ".owner")


def try_lock(path) -> HeldLock | None:
    """An exclusive lock on `path` (the file is created), or None while another process holds it."""
    path = Path(path)
    f = open(path, "a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        _name_holder(f)
        return HeldLock(path, handle=f)
    except OSError as exc:
        f.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        if exc.errno not in _FLOCK_REFUSED:
            raise
        _tell_no_flock(path, exc)
    return _try_owner_file(path)


def lock_holder(path) -> str | None:
    """Who holds the lock of `path` ("host H, pid P"): its owner file's holder, else the one an flock's
    holder wrote into the lock file; None if neither says. Meaningful while try_lock returns None."""
    owner = _read_owner(owner_file_of(path)) or _read_owner(Path(path))
    return f"host {owner.get('host')}, pid {owner.get('pid')}" if owner else None


def _name_holder(f) -> None:
    """The flock's holder writes who it is into the lock file, so that a process refused can name it
    (the lock file's content is never what locks)."""
    try:
        f.truncate(0)
        f.write(json.dumps(_me()))
        f.flush()
    except OSError:  # a full disk: the lock holds all the same, only unnamed
        pass


@contextlib.contextmanager
def locked(path, poll_s: float = 0.5):
    """Hold the lock on `path` inside, waiting for it as long as another process holds it."""
    while (lock := try_lock(path)) is None:
        time.sleep(poll_s)  # flock's own blocking wait is not open to the owner-file fallback
    try:
        yield lock
    finally:
        lock.close()


def _tell_no_flock(path: Path, exc: OSError) -> None:
    """One line per folder: why locks there are owner files."""
    folder = str(path.parent)
    if folder not in _told_no_flock:
        _told_no_flock.add(folder)
        print(f"note: the file system of {folder} refuses flock ({errno.errorcode.get(exc.errno, exc.errno)}; on "
              "Lustre, mount it with -o flock); locking with owner files there instead", file=sys.stderr)


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(), "started": _start_ticks(os.getpid())}


def _try_owner_file(path: Path) -> HeldLock | None:
    owner_file, me = owner_file_of(path), _me()
    for _ in range(2):  # a second try after breaking a stale owner file
        try:
            fd = os.open(owner_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK)
        except FileExistsError:
            seen = _read_owner(owner_file)
            if seen is None or not _is_stale(seen):  # unreadable: being written right now
                return None
            _break_stale(owner_file, seen)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())
        return HeldLock(path, owner_file=owner_file, owner=me)
    return None


def _read_owner(owner_file: Path) -> dict | None:
    try:
        owner = json.loads(Path(owner_file).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _is_stale(owner: dict) -> bool:
    """Whether an owner file's process is gone: on this host, its pid is not running since this boot
    with the start time it wrote (a reused pid is another process). Another host's: never known."""
    if owner.get("host") != socket.gethostname():
        return False
    if owner.get("boot") != _boot_id():
        return True
    return _start_ticks(int(owner.get("pid", -1))) != owner.get("started")


def _break_stale(owner_file: Path, seen: dict) -> None:
    """Remove a stale owner file, unless another process has broken it and taken the lock meanwhile:
    the rename moves one file at most once, and what was moved is checked before it is dropped."""
    aside = owner_file.with_name(f"{owner_file.name}.stale-{os.getpid()}")
    try:
        os.rename(owner_file, aside)
    except FileNotFoundError:  # another process broke it first
        return
    if _read_owner(aside) != seen:  # a live holder's file: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, owner_file)
    aside.unlink(missing_ok=True)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """A running process's start time (clock ticks since boot, /proc/PID/stat field 22), or None."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_running(pid: int) -> bool:
    """Whether a process of this pid runs on this host (another user's included)."""
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, the process is only looked up
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
