"""The GPU check's time guard: a part runs as a child process and, past its limit, every process it
started is killed and waited for, so no worker keeps GPU memory while the next part is timed.

Killing the part's process group is not enough: torchrun starts each worker in a session of its own
(torch.distributed.elastic's subprocess handler), and a worker whose launcher died is re-parented
away from the part. So the guard (Linux)
- marks itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER): an orphaned descendant is re-parented
  to the guard rather than to init, and stays findable as one of its children;
- on a cut, freezes the part's whole tree with SIGSTOP (a stopped process cannot fork, so the walk of
  /proc reaches a fixed point), then sends SIGKILL through a pidfd per process (a pid reused meanwhile
  is not hit) and waits on each pidfd until its process has exited;
- after any part, cut or not, does the same to what the part left behind (orphans now the guard's).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
EXIT_WAIT_S = 60.0  # a killed process exits at once, unless the driver is releasing its GPU memory


def become_subreaper() -> bool:
    """Orphans of this process's descendants become its children (Linux >= 3.4); False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process that /proc shows."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # the command name (field 2) may hold spaces and parentheses: fields resume after the last ')'
        out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(roots: set[int]) -> dict[int, int]:
    """pid -> parent pid of every process below `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(roots)
    while todo:
        parent = todo.pop()
        for pid in children.get(parent, []):
            if pid not in found and pid not in roots:
                found[pid] = parent
                todo.append(pid)
    return found


def _open(pid: int, parent: int) -> int | None:
    """A pidfd for `pid` if it is still the child of `parent` (or was re-parented to this guard)."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    try:  # the pid was read before the pidfd was opened: check it still names the same process
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        ppid = None
    if ppid not in (parent, os.getpid()):
        os.close(fd)
        return None
    return fd


def kill_tree(root_fd: int, root: int, spare: set[int] = frozenset()) -> list[int]:
    """Freeze, kill and wait for every process below `root` (its pidfd: `root_fd`) and every child of
    this process outside `spare` (orphans re-parented here); `root` itself too when it is still
    running. Returns the pids killed. `root` is left for its Popen to reap; the others, when they are
    this process's children, are reaped here."""
    me, fds = os.getpid(), {}
    # an exited root's pid may name another process by now: walk from it only while it runs
    running = not select.select([root_fd], [], [], 0)[0]
    if running:
        _signal(root_fd, signal.SIGSTOP)
    while True:  # until a walk finds nobody new: stopped processes start no others
        ours = {pid: me for pid, ppid in _parents().items() if ppid == me and pid not in spare and pid != root}
        below = descendants({root, *ours} if running else set(ours))
        opened = 0
        for pid, parent in {**ours, **below}.items():
            if pid in fds or (fd := _open(pid, parent)) is None:
                continue
            fds[pid], opened = fd, opened + 1
            _signal(fd, signal.SIGSTOP)
        if not opened:
            break
    if running:
        _signal(root_fd, signal.SIGKILL)
    for fd in fds.values():
        _signal(fd, signal.SIGKILL)
    deadline = time.monotonic() + EXIT_WAIT_S
    for fd in [root_fd, *fds.values()] if running else fds.values():
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))  # readable once it has exited
    # all have exited, so every orphan has been re-parented by now: reap those that are ours
    for fd in fds.values():
        try:
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            pass  # not our child (no subreaper here): init reaps it
        os.close(fd)
    return sorted({root, *fds} if running else fds)


def _signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass  # exited meanwhile


class Part:
    """A part's process (a session of its own) with its pidfd, and this process's children from before
    it, which kill_tree spares (whatever else the caller runs)."""

    def __init__(self, cmd: list[str], **kw):
        become_subreaper()
        me = os.getpid()
        self.spare = {pid for pid, ppid in _parents().items() if ppid == me}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, **kw)
        self.fd = os.pidfd_open(self.proc.pid)

    def finish(self, timeout_s: float) -> tuple[int | None, str, str]:
        """(return code, stdout, stderr) once the part ends; None when it ran past `timeout_s`, and then
        its whole tree is killed (kill_tree). Leftovers of a part that ended on its own are killed too."""
        try:
            out, err = self.proc.communicate(timeout=max(0.0, timeout_s))
            code = self.proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        try:
            kill_tree(self.fd, self.proc.pid, self.spare)
        finally:
            os.close(self.fd)
        if code is None:
            out, err = self.proc.communicate()
        return code, out, err


def run_bounded(cmd: list[str], timeout_s: float, **kw) -> tuple[int | None, str, str]:
    """(return code, stdout, stderr) of a command; None when it ran past `timeout_s`, and then every
    process it started (torchrun's workers in their own sessions included) is killed and waited for."""
    return Part(cmd, **kw).finish(max(1.0, timeout_s))
