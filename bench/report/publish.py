"""How a report reaches its folder: one report of a folder at a time, each built in a staging folder of
its own and moved into place when whole, so that report.md, tables/ and figures/ are always one
report's (two `report`s at once, or the ones two `run`s write as they end, never mix or delete each
other's files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from bench import fileio

STAGING = ".report-staging"  # + "-<pid>-<random>": one per report
LOCK = ".report.lock"
MANIFEST = ".report-files.json"  # what the report in place consists of
FOLDERS = ("tables", "figures")  # the report's own: nothing else writes there


@contextlib.contextmanager
def staged_report(out: Path):
    """Inside: a fresh staging folder of this process to build a report of `out` into, while this
    process holds `out`'s report lock (another report waits for it). When the block ends without an
    error, the staging folder's files replace the report in place; with one, the report in place stays
    as it was. Staging folders left by killed reports are removed first: while the lock is held, no
    other report is building."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with fileio.locked(out / LOCK):
        for stale in out.glob(f"{STAGING}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}-{os.getpid()}-", dir=out))
        try:
            yield staging
            publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Move a whole report from `staging` into `out`, file by file (renames: no space needed, no half
    file seen), report.md last; then remove what the report before it had and this one has not (a
    header-only table of an earlier build never stays beside a new report.md)."""
    new = sorted((p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()),
                 key=lambda rel: (rel == "report.md", rel))
    old = previous_files(out)
    fileio.write_json(out / MANIFEST, sorted(set(old) | set(new)))  # a kill below leaves a record of both
    for rel in new:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    for rel in sorted(set(old) - set(new)):
        (out / rel).unlink(missing_ok=True)
    fileio.write_json(out / MANIFEST, new)
    for folder in (out / f for f in FOLDERS):  # temporaries of reports killed before staging existed
        fileio.remove_stale_temporaries(folder)
    for stale in out.glob(".report*.tmp"):  # report.md's and the manifest's
        stale.unlink(missing_ok=True)


def previous_files(out: Path) -> list[str]:
    """The files of the report in place: its manifest, or (a report from before manifests) every file
    of its own folders."""
    try:
        listed = fileio.read_json(out / MANIFEST)
    except (OSError, ValueError):
        listed = None
    if isinstance(listed, list) and all(isinstance(x, str) for x in listed):
        return [x for x in listed if ".." not in Path(x).parts and not Path(x).is_absolute()]
    return [p.relative_to(out).as_posix() for f in FOLDERS if (out / f).is_dir() for p in (out / f).rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")]
