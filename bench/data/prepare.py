"""Prepare a dataset once, in a form training reads fast: `python run_bench.py prepare KIND [SRC]`.

Kinds:
  imagenet128   ILSVRC2012 train images (Russakovsky et al. 2015) from SRC =
                  a tree SRC/nXXXXXXXX/*.JPEG (or SRC/train/nXXXXXXXX/...),
                  a flat folder of nXXXXXXXX_*.JPEG files, or
                  Hugging Face `imagenet-1k` parquet shards (a folder, a .parquet file or a glob;
                  a folder's train-*.parquet if it has any, else every *.parquet under it),
                  read with pyarrow alone. Labels: the index of the WordNet id in the sorted ids
                  present (0..999 for the full set); for parquet, the `label` column as is.
                  Default resolution 128.
  folder:PATH   a user's images (jpg/jpeg/png/webp/bmp, any case). Class subfolders give labels by
                  sorted folder name; a flat folder is unlabelled (every label -1). --resolution needed.
  cifar10       CIFAR-10 through datasets/cifar10.py (SRC: the folder holding cifar-10-batches-py,
                  optional); both splits, at 32 px unless --resolution says otherwise.

Every image goes through ADM's centre crop (`center_crop_arr`, openai/guided-diffusion
guided_diffusion/image_datasets.py; Dhariwal & Nichol 2021): convert to RGB, halve with a BOX
filter while the short side is >= 2R, bicubic resize so the short side is R, centre crop R x R.
No flip (a training-time augmentation).

Output folder OUT (default $DIFFBENCH_CACHE/prepared/<name>-<resolution>):
  images.npy       uint8 (N, 3, R, R), a plain .npy file (written through numpy's open_memmap), so
                   `np.load(path, mmap_mode="r")` maps it without reading it
  labels.npy       int64 (N,); -1 where the source has no labels
  images_test.npy, labels_test.npy   cifar10 only: its test split, same layout
  manifest.json    kind, source (path and layout), counts (found, written, skipped), label_map,
                   transform, resolution, split(s), created time, seconds, sha256 of each array file,
                   the skipped (undecodable) files with the reason, the command that made it

Undecodable or truncated files are skipped, counted and named in the manifest, never fatal; their
rows are left out, so N is the number of images written. Rows keep the order of the sorted source
list (parquet: shard name, then row).

Nothing is half-written: the work happens in OUT.partial/, renamed to OUT at the end. OUT.partial
holds plan.json (settings and a fingerprint of the sorted source list), items-<split>.txt (that list:
label TAB name per line), the arrays (allocated for every source image, shrunk at the end) and
progress-<split>.json (chunks done, rows written, skipped so far), rewritten atomically after each
chunk's rows are flushed to disk. Chunks are written in order, so a chunk's rows start where the
previous chunk's ended. Rerunning the same command after a kill continues from the last chunk
recorded; a changed source list is refused (--force starts over). A partial folder without a
plan.json comes from a start that failed before any work and is discarded. An OUT that already holds
a manifest is never overwritten without --force. The source check compares the sorted names and labels
(and parquet shard sizes, cifar10's data hash), not every file's contents or time stamps.

Decoding runs in `workers` processes (default: every core this process may use), forked like torch's
DataLoader workers; they end by themselves if the parent is killed. `python -m bench.tools.speed_prepare`
measures prepare's images/s and the images/s of gathering training batches from the memory map.
"""

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.prepared import file_sha256, load_prepared, npy_header, verify_prepared  # noqa: F401 (re-exported API)
from bench.data.sources import UNLABELLED, Plan, Split, default_out, kind_resolution, make_plan, parse_kind
from bench.errors import ConfigError, DatasetError
from bench.fileio import read_json, write_json
from bench.terminal import progress_bar

CHUNK = 1024  # images per resumable unit: one progress record per chunk
TASK = 32  # images per job sent to a worker: small enough that 2 workers share 400 images evenly
SPLIT_FILES = {"train": ("images.npy", "labels.npy"), "test": ("images_test.npy", "labels_test.npy")}
TRANSFORM = ("ADM center_crop_arr (openai/guided-diffusion image_datasets.py): convert to RGB; while the short "
             "side >= 2R, halve both sides (floor) with Image.BOX; resize with Image.BICUBIC so the short side "
             "is R (other side round(side * R / short), Python round); crop R x R at floor((side - R) / 2); "
             "no flip")


# ---------------------------------------------------------------------------------------------
# The transform (runs in the worker processes)


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop, as in openai/guided-diffusion guided_diffusion/image_datasets.py
    `center_crop_arr`: returns uint8 (size, size, C).

    The BOX halvings come first because a single large bicubic downscale aliases; ADM did them by hand
    on a PIL without `reducing_gap`. Sizes use floor for the halvings and Python's round (half to even)
    for the bicubic step, as the reference does, so arrays match ADM's byte for byte.
    """
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=Image.Resampling.BICUBIC)
    top, left = (image.height - size) // 2, (image.width - size) // 2
    return np.asarray(image)[top:top + size, left:left + size]


def _open_rgb(payload) -> Image.Image:
    """A path, encoded bytes or an HWC uint8 array -> a fully decoded RGB image (ADM converts first)."""
    if isinstance(payload, np.ndarray):
        return Image.fromarray(payload).convert("RGB")
    with Image.open(BytesIO(payload) if isinstance(payload, bytes) else payload) as image:
        image.load()  # decode now: a truncated file raises here, not later inside resize
        return image.convert("RGB")


def decode_task(payloads: list, size: int):
    """Decode and crop a few images. Returns (uint8 [n_ok, 3, size, size], ok positions,
    [(position, reason)] for the ones that could not be decoded)."""
    out = np.empty((len(payloads), 3, size, size), dtype=np.uint8)
    ok, failed = [], []
    for i, payload in enumerate(payloads):
        try:
            arr = center_crop_arr(_open_rgb(payload), size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a skipped file, named in the manifest
            failed.append((i, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        out[len(ok)] = arr.transpose(2, 0, 1)
        ok.append(i)
    return out[:len(ok)], ok, failed


def _worker_init(parent: int) -> None:
    # Ctrl-C goes to the whole process group: the parent stops the pool; the workers just finish their job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A killed parent never tells its pool to stop, and forked workers would wait for work forever."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


# ---------------------------------------------------------------------------------------------
# The partial folder: create, resume, write chunks, finish


def _after_chunk(split: str, chunk: int) -> None:
    """Called after each chunk is recorded as done (tests patch it to simulate a kill)."""


def _check_out(out: Path, force: bool) -> None:
    if (out / "manifest.json").exists():
        if not force:
            raise DatasetError(f"{out} already holds a prepared dataset; results are never overwritten: "
                               "choose another --out, or pass --force to replace it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} exists and is not a prepared dataset; choose another --out")


def _open_partial(partial: Path, plan: Plan, chunk_size: int, force: bool) -> dict:
    """Resume a partial folder of the same plan, or start a fresh one. Returns plan.json's content."""
    fingerprint = plan.fingerprint()
    if partial.exists():
        try:
            saved = read_json(partial / "plan.json")
        except (OSError, ValueError):
            saved = None  # a start that failed before any work: nothing to keep
        if saved is not None and saved["fingerprint"] == fingerprint:
            return saved
        if saved is not None and not force:
            raise DatasetError(f"{partial} holds an unfinished preparation of a different source list or settings "
                               f"(the source changed since it began); pass --force to discard it and start over")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    for split in plan.splits:
        images_file, labels_file = SPLIT_FILES[split.name]
        lines = "".join(f"{label}\t{name}\n" for label, name in zip(split.labels.tolist(), split.items))
        (partial / f"items-{split.name}.txt").write_text(lines)
        n, r = len(split.items), plan.resolution
        np.lib.format.open_memmap(partial / images_file, mode="w+", dtype=np.uint8, shape=(n, 3, r, r))._mmap.close()
        np.lib.format.open_memmap(partial / labels_file, mode="w+", dtype=np.int64, shape=(n,))._mmap.close()
    saved = {"fingerprint": fingerprint, "chunk_size": chunk_size, "kind": plan.kind, "src": plan.src,
             "resolution": plan.resolution, "splits": {s.name: len(s.items) for s in plan.splits}}
    write_json(partial / "plan.json", saved)  # last: its presence marks a usable partial folder
    return saved


def _tasks(n: int, chunk_size: int, first_chunk: int):
    """(chunk, start, stop) jobs in output order, none crossing a chunk boundary."""
    for start in range(first_chunk * chunk_size, n, chunk_size):
        chunk, stop = start // chunk_size, min(start + chunk_size, n)
        for a in range(start, stop, TASK):
            yield chunk, a, min(a + TASK, stop)


def start_pool(workers: int):
    """`workers` decoding processes, all started now; None for workers=1 (decode in this process).

    Fork where the platform has it, as torch's DataLoader does: the workers need nothing but PIL and
    numpy, and unlike spawn, fork does not re-run the caller's main module (which breaks a script
    without an `if __name__ == "__main__"` guard). All are started here, before the progress bar's
    thread exists, so no thread's lock is copied mid-use."""
    if workers <= 1:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_worker_init, initargs=(os.getpid(),))
    for fut in [pool.submit(int, 0) for _ in range(workers)]:
        fut.result()
    return pool


def _results(split: Split, jobs, resolution: int, pool, workers: int):
    """(chunk, start, stop, decode_task result) in job order; the pool's processes decode ahead."""
    if pool is None:
        for chunk, a, b in jobs:
            yield chunk, a, b, decode_task(split.read(a, b), resolution)
        return
    pending = deque()
    window = 4 * workers  # bounded, so memory stays flat (parquet bytes are read here, ahead)
    for job in jobs:
        pending.append((job, pool.submit(decode_task, split.read(job[1], job[2]), resolution)))
        while len(pending) >= window:
            job, fut = pending.popleft()
            yield (*job, fut.result())
    while pending:
        job, fut = pending.popleft()
        yield (*job, fut.result())


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console  # rich only when a bar is shown


    return progress_bar(Console(stderr=True), "images")


def _run_split(partial: Path, split: Split, saved: dict, resolution: int, pool, workers: int, bar) -> None:
    """Decode every chunk not yet recorded as done, appending rows in order."""
    progress_file = partial / f"progress-{split.name}.json"
    state = read_json(progress_file) if progress_file.exists() else {"chunks_done": 0, "rows": 0, "skipped": [],
                                                                     "seconds": 0.0}
    chunk_size, n = saved["chunk_size"], len(split.items)
    n_chunks = -(-n // chunk_size)
    task = bar.add_task(f"{split.name}", total=n, completed=min(n, state["chunks_done"] * chunk_size)) if bar else None
    if state["chunks_done"] >= n_chunks:
        return
    images_file, labels_file = SPLIT_FILES[split.name]
    images = np.load(partial / images_file, mmap_mode="r+")
    labels = np.load(partial / labels_file, mmap_mode="r+")
    rows, skipped, t0 = state["rows"], list(state["skipped"]), time.perf_counter()
    for chunk, a, b, (arr, ok, failed) in _results(split, _tasks(n, chunk_size, state["chunks_done"]),
                                                   resolution, pool, workers):
        # rows past state["rows"] are uncommitted: a kill before the record below means they are redone
        images[rows:rows + len(ok)] = arr
        labels[rows:rows + len(ok)] = split.labels[a + np.asarray(ok, dtype=np.int64)]
        rows += len(ok)
        skipped += [{"split": split.name, "file": split.items[a + i], "reason": why} for i, why in failed]
        if bar:
            bar.advance(task, b - a)
        if b == n or b % chunk_size == 0:  # the chunk's last job: make it durable, then record it
            images.flush()
            labels.flush()
            now = time.perf_counter()
            state = {"chunks_done": chunk + 1, "rows": rows, "skipped": skipped,
                     "seconds": state["seconds"] + now - t0}
            t0 = now
            write_json(progress_file, state)
            _after_chunk(split.name, chunk)


def _set_npy_rows(path: Path, rows: int) -> None:
    """Shrink a .npy file's first axis to `rows` in place: rewrite the header at the same length (NEP 1
    pads it with spaces; a smaller number never needs more room) and cut the file. Repeatable."""
    shape, dtype, offset = npy_header(path)
    shape = (rows, *shape[1:])
    prefix = 10 if _npy_version(path) == (1, 0) else 12  # magic and version, then a 2- or 4-byte length
    text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {shape}, }}"
    with open(path, "r+b") as f:
        f.seek(prefix)
        f.write((text.ljust(offset - prefix - 1) + "\n").encode("latin1"))
        f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)


def _npy_version(path: Path) -> tuple:
    with open(path, "rb") as f:
        return np.lib.format.read_magic(f)


def _command(plan: Plan, out: Path) -> str:
    kind = f"folder:{plan.src}" if plan.kind == "folder" else f"{plan.kind} {plan.src}"
    return f"python run_bench.py prepare {kind} --resolution {plan.resolution} --out {out}"


def _finish(partial: Path, plan: Plan, out: Path) -> dict:
    """Shrink the arrays to the rows written, hash them and write the manifest (all repeatable)."""
    splits, skipped, seconds = {}, [], 0.0
    for split in plan.splits:
        state = read_json(partial / f"progress-{split.name}.json")
        images_file, labels_file = SPLIT_FILES[split.name]
        for name in (images_file, labels_file):
            _set_npy_rows(partial / name, state["rows"])
        splits[split.name] = {"images": images_file, "labels": labels_file, "found": len(split.items),
                              "written": state["rows"], "skipped": len(state["skipped"]),
                              "sha256": {name: file_sha256(partial / name) for name in (images_file, labels_file)}}
        skipped += state["skipped"]
        seconds += state["seconds"]
    train = splits["train"]
    if train["written"] == 0:
        first = f" (first: {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""
        shutil.rmtree(partial)
        raise DatasetError(f"none of the {train['found']} images in {plan.src} could be decoded{first}; "
                           "check that SRC holds readable images")
    manifest = {
        "format": "diffbench-prepared/1",
        "kind": plan.kind,
        "source": {"path": plan.src, "kind": plan.source_kind, **plan.extra},
        "resolution": plan.resolution,
        "channels": 3,
        "split": "train",
        "counts": {k: sum(s[k] for s in splits.values()) for k in ("found", "written", "skipped")},
        "splits": splits,
        "files": {"images": train["images"], "labels": train["labels"]},
        "sha256": train["sha256"],
        "labelled": plan.label_map != UNLABELLED,
        "label_map": plan.label_map,
        "transform": TRANSFORM,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "command": _command(plan, out),
        "skipped": skipped,
    }
    write_json(partial / "manifest.json", manifest)
    return manifest


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished partial folder to OUT; a replaced OUT (--force) is removed only afterwards."""
    old = out.with_name(out.name + ".old")
    if (out / "manifest.json").exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(partial, out)
    if old.exists():
        shutil.rmtree(old)


def _cpus() -> int:
    """CPU cores this process may use (a container or Slurm job may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare(kind: str, src: str | None, out: Path | None = None, resolution: int | None = None,
            workers: int | None = None, progress: bool = True, force: bool = False,
            chunk_size: int = CHUNK) -> Path:
    """Write the dataset `kind` read from `src` into `out` (layout: this module's docstring); returns `out`.

    Resumes an unfinished OUT.partial of the same source and settings; `chunk_size` only applies to a
    fresh start (a resumed one keeps the chunks it began with)."""
    kind, src = parse_kind(kind, src)
    resolution = kind_resolution(kind, resolution)
    out = Path(out) if out else default_out(kind, src, resolution)
    workers = _cpus() if workers is None else int(workers)
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    _check_out(out, force)
    plan = make_plan(kind, src, resolution)  # raises before anything is created when SRC is unusable
    partial = out.with_name(out.name + ".partial")
    saved = _open_partial(partial, plan, chunk_size, force)
    pool = start_pool(workers)
    bar = _progress_bar(progress)
    try:
        if bar:
            bar.start()
        for split in plan.splits:
            _run_split(partial, split, saved, resolution, pool, workers, bar)
    finally:
        if bar:
            bar.stop()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    _finish(partial, plan, out)
    _publish(partial, out)
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def add_prepare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="write a dataset once as memory-mappable arrays (ImageNet, a folder, CIFAR-10)",
                       description="Write a dataset once as uint8 arrays training maps without decoding "
                                   "(ADM centre crop). Resumes an interrupted run; never overwrites without --force.")
    p.add_argument("kind", metavar="KIND", help="imagenet128, cifar10 or folder:PATH")
    p.add_argument("src", nargs="?", metavar="SRC",
                   help="imagenet128: ILSVRC train folder, flat folder or parquet shards; cifar10: folder holding "
                        "cifar-10-batches-py (optional)")
    p.add_argument("--out", help="output folder (default $DIFFBENCH_CACHE/prepared/<name>-<resolution>)")
    p.add_argument("--resolution", type=int, help="side of the square images (imagenet128: 128, cifar10: 32, "
                                                  "folder: required)")
    p.add_argument("--workers", type=int, help="decoding processes (default: every CPU core)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT (or discard a stale OUT.partial)")
    p.set_defaults(func=cmd_prepare)
    return p


def cmd_prepare(args) -> None:
    out = prepare(args.kind, args.src, Path(args.out) if args.out else None, args.resolution, args.workers,
                  progress=sys.stderr.isatty(), force=args.force)
    m = read_json(out / "manifest.json")
    c, s = m["counts"], m["seconds"]
    print(out)
    print(f"{c['written']} images written, {c['skipped']} skipped, {s:.1f} s, "
          f"{c['written'] / s if s > 0 else float('inf'):.0f} images/s")


