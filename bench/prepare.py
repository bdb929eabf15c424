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
DataLoader workers; they end by themselves if the parent is killed. `python -m bench.prepare --bench`
measures prepare's images/s and the images/s of gathering training batches from the memory map.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from glob import glob
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bench.errors import ConfigError, DatasetError
from bench.fileio import read_json, write_json

KINDS = ("imagenet128", "cifar10", "folder")
DEFAULT_RESOLUTION = {"imagenet128": 128, "cifar10": 32}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
WNID = re.compile(r"n\d{8}")
FLAT_NAME = re.compile(r"(n\d{8})_.+")
CHUNK = 1024  # images per resumable unit: one progress record per chunk
TASK = 32  # images per job sent to a worker: small enough that 2 workers share 400 images evenly
SPLIT_FILES = {"train": ("images.npy", "labels.npy"), "test": ("images_test.npy", "labels_test.npy")}
TRANSFORM = ("ADM center_crop_arr (openai/guided-diffusion image_datasets.py): convert to RGB; while the short "
             "side >= 2R, halve both sides (floor) with Image.BOX; resize with Image.BICUBIC so the short side "
             "is R (other side round(side * R / short), Python round); crop R x R at floor((side - R) / 2); "
             "no flip")
PARQUET_LABELS = "from the parquet label column"
UNLABELLED = "unlabelled: a flat folder, every label is -1"


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
# Sources: what to read, in which order, with which labels


@dataclass
class Split:
    name: str
    items: list[str]  # names, in output order (relative paths, shard#row, split/index)
    labels: np.ndarray  # int64, one per item
    read: Callable[[int, int], list]  # (start, stop) -> payloads for decode_task


@dataclass
class Plan:
    kind: str
    src: str
    source_kind: str
    resolution: int
    label_map: dict | str
    splits: list[Split]
    extra: dict = field(default_factory=dict)  # e.g. parquet shard names, cifar10 data hash

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.kind, self.src, self.source_kind, self.resolution, self.extra]).encode())
        for split in self.splits:
            h.update(split.name.encode())
            for label, name in zip(split.labels.tolist(), split.items):
                h.update(f"{label}\t{name}\n".encode())
        return h.hexdigest()


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _scan(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted subfolder names, sorted image file names) directly in `folder`; hidden entries ignored."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs.append(e.name)
            elif e.is_file() and _is_image(e.name):
                files.append(e.name)
    return sorted(dirs), sorted(files)


def _walk_images(folder: Path) -> list[str]:
    """Image files under `folder`, as sorted posix paths relative to it."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files if _is_image(f) and not f.startswith(".")]
    return sorted(out)


def _file_split(root: Path, names: list[str], labels: list[int]) -> Split:
    paths = [str(root / n) for n in names]
    return Split("train", names, np.asarray(labels, dtype=np.int64), lambda a, b: paths[a:b])


def _imagenet_tree(src: Path) -> Plan | None:
    root = src / "train" if (src / "train").is_dir() else src
    dirs, files = _scan(root)
    wnids = [d for d in dirs if WNID.fullmatch(d)]
    if wnids:
        names, labels = [], []
        for label, wnid in enumerate(wnids):
            for f in _scan(root / wnid)[1]:
                names.append(f"{wnid}/{f}")
                labels.append(label)
        return Plan("imagenet128", str(root), "ilsvrc-tree", 0, {w: i for i, w in enumerate(wnids)},
                    [_file_split(root, names, labels)])
    flat = [(m.group(1), f) for f in files if (m := FLAT_NAME.fullmatch(f))]
    if flat:
        flat.sort()  # by WordNet id, then file name: the tree's order
        wnids = sorted({w for w, _ in flat})
        index = {w: i for i, w in enumerate(wnids)}
        return Plan("imagenet128", str(root), "ilsvrc-flat", 0, index,
                    [_file_split(root, [f for _, f in flat], [index[w] for w, _ in flat])])
    return None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("reading parquet shards needs pyarrow, which is not installed; "
                           "install it: pip install pyarrow") from None
    return pq


def _parquet_shards(src: str) -> list[Path]:
    if any(c in src for c in "*?["):
        return [Path(p) for p in sorted(glob(src)) if p.endswith(".parquet")]
    path = Path(src)
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    shards = sorted(path.rglob("*.parquet"))
    train = [p for p in shards if p.name.startswith("train")]
    return train or shards  # the HF layout holds train-/validation-/test- shards side by side


class _ParquetReader:
    """Image bytes of global rows [a, b), read one row group at a time (never a whole shard)."""

    def __init__(self, shards: list[Path], row_counts: list[int]):
        self.shards = shards
        self.starts = np.cumsum([0] + row_counts)
        self.groups = {}  # shard -> first row of each row group, then the shard's row count
        self.cached = (None, None, None)  # (shard, row group, list of bytes)

    def _row(self, shard: int, row: int) -> bytes:
        pq = _pyarrow_parquet()
        if shard not in self.groups:
            meta = pq.ParquetFile(self.shards[shard]).metadata
            self.groups[shard] = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        starts = self.groups[shard]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        if self.cached[:2] != (shard, g):
            table = pq.ParquetFile(self.shards[shard]).read_row_group(g, columns=["image"])
            self.cached = (shard, g, table.column("image").combine_chunks().field("bytes").to_pylist())
        return self.cached[2][row - int(starts[g])]

    def __call__(self, a: int, b: int) -> list:
        out = []
        for i in range(a, b):
            shard = int(np.searchsorted(self.starts, i, side="right") - 1)
            out.append(self._row(shard, i - int(self.starts[shard])))
        return out


def _imagenet_parquet(src: str) -> Plan | None:
    shards = _parquet_shards(src)
    if not shards:
        return None
    pq = _pyarrow_parquet()
    names, labels, counts = [], [], []
    for shard in shards:
        pf = pq.ParquetFile(shard)
        if "image" not in pf.schema_arrow.names or "label" not in pf.schema_arrow.names:
            raise DatasetError(f"{shard} has no image/label columns (columns: {', '.join(pf.schema_arrow.names)}); "
                               "point SRC at Hugging Face imagenet-1k parquet shards")
        n = pf.metadata.num_rows
        counts.append(n)
        names += [f"{shard.name}#{r}" for r in range(n)]
        labels.append(pf.read(columns=["label"]).column("label").to_numpy().astype(np.int64))
    split = Split("train", names, np.concatenate(labels), _ParquetReader(shards, counts))
    extra = {"shards": [[s.name, s.stat().st_size, n] for s, n in zip(shards, counts)]}
    return Plan("imagenet128", src, "hf-parquet", 0, PARQUET_LABELS, [split], extra)


def _plan_imagenet(src: str | None) -> Plan:
    if not src:
        raise DatasetError("imagenet128 needs SRC: the ILSVRC2012 train folder (nXXXXXXXX/*.JPEG) or "
                           "imagenet-1k parquet shards, e.g. prepare imagenet128 /data/ILSVRC2012/train")
    path = Path(src)
    is_glob = any(c in src for c in "*?[")
    if not is_glob and not path.exists():
        raise DatasetError(f"{src} does not exist; pass the ILSVRC2012 train folder or a folder of "
                           "imagenet-1k parquet shards as SRC")
    if not is_glob:
        path = path.resolve()  # the same folder spelled another way is the same source on a rerun
        src = str(path)
    plan = None if is_glob or path.is_file() else _imagenet_tree(path)
    plan = plan or _imagenet_parquet(src)
    if plan is None:
        tars = [] if is_glob or path.is_file() else sorted(path.glob("n*.tar"))
        hint = ("it holds .tar archives: extract each nXXXXXXXX.tar into nXXXXXXXX/" if tars else
                "expected nXXXXXXXX/*.JPEG, nXXXXXXXX_*.JPEG or imagenet-1k *.parquet shards")
        raise DatasetError(f"no ImageNet images in {src}: {hint}")
    return plan


def _plan_folder(src: str | None) -> Plan:
    if not src:
        raise DatasetError("folder needs a path: prepare folder:PATH --resolution R")
    root = Path(src).resolve()
    if not root.is_dir():
        raise DatasetError(f"{src} is not a folder; pass a folder of images as folder:PATH")
    dirs, files = _scan(root)
    classes = [(d, _walk_images(root / d)) for d in dirs]
    classes = [(d, names) for d, names in classes if names]
    if classes and files:
        raise DatasetError(f"{src} has images both at the top ({files[0]}, ...) and in class subfolders; "
                           "move the top-level images into a class folder (or out)")
    if classes:
        names = [f"{d}/{n}" for d, ns in classes for n in ns]
        labels = [i for i, (_, ns) in enumerate(classes) for _ in ns]
        label_map = {d: i for i, (d, _) in enumerate(classes)}
        return Plan("folder", str(root), "folder-classes", 0, label_map, [_file_split(root, names, labels)])
    if not files:
        raise DatasetError(f"no images in {src} (looked for {', '.join(sorted(IMAGE_EXTS))} files, "
                           "directly or in class subfolders); point folder:PATH at a folder of images")
    return Plan("folder", str(root), "folder-flat", 0, UNLABELLED, [_file_split(root, files, [-1] * len(files))])


def _plan_cifar10(src: str | None) -> Plan:
    from bench.data import cache_dir, dataset_info

    loader = dataset_info("cifar10")
    splits, h = [], hashlib.sha256()
    for name in ("train", "test"):
        try:
            images, labels = loader.load(name, src, cache_dir() / "data" / "cifar10")
        except FileNotFoundError as exc:
            raise DatasetError(str(exc)) from None
        hwc = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 2, 3, 1))
        labels = np.asarray(labels, dtype=np.int64)
        h.update(hwc.tobytes())
        h.update(labels.tobytes())
        splits.append(Split(name, [f"{name}/{i:05d}" for i in range(len(hwc))], labels,
                            lambda a, b, x=hwc: list(x[a:b])))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return Plan("cifar10", str(Path(src).resolve() if src else cache_dir() / "data" / "cifar10"), "cifar10-python", 0,
                {c: i for i, c in enumerate(classes)}, splits, {"data_sha256": h.hexdigest()})


def parse_kind(kind: str, src: str | None) -> tuple[str, str | None]:
    """'folder:PATH' -> ('folder', PATH); other kinds as given."""
    if kind.startswith("folder:"):
        if src:
            raise ConfigError(f"folder:PATH takes its path after the colon; drop the extra SRC {src!r}")
        return "folder", kind.split(":", 1)[1]
    if kind not in KINDS:
        raise ConfigError(f"unknown prepare kind {kind!r}; use imagenet128, cifar10 or folder:PATH")
    return kind, src


def _resolution(kind: str, resolution: int | None) -> int:
    if resolution is None:
        if kind not in DEFAULT_RESOLUTION:
            raise ConfigError("folder:PATH needs --resolution R (the side of the square images to write)")
        return DEFAULT_RESOLUTION[kind]
    if int(resolution) < 1:
        raise ConfigError(f"--resolution {resolution} must be a positive number of pixels")
    return int(resolution)


def make_plan(kind: str, src: str | None, resolution: int) -> Plan:
    plan = {"imagenet128": _plan_imagenet, "folder": _plan_folder, "cifar10": _plan_cifar10}[kind](src)
    plan.resolution = resolution
    return plan


def default_out(kind: str, src: str | None = None, resolution: int | None = None) -> Path:
    """$DIFFBENCH_CACHE/prepared/<name>-<resolution>; a folder's name is its last path component."""
    from bench.data import cache_dir

    kind, src = parse_kind(kind, src)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(src).resolve().name) if kind == "folder" else kind
    return cache_dir() / "prepared" / f"{name}-{_resolution(kind, resolution)}"


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


def _start_pool(workers: int):
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
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))


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
    shape, dtype, offset = _npy_header(path)
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


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
                              "sha256": {name: _sha256(partial / name) for name in (images_file, labels_file)}}
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
    resolution = _resolution(kind, resolution)
    out = Path(out) if out else default_out(kind, src, resolution)
    workers = int(workers or _cpus())
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    _check_out(out, force)
    plan = make_plan(kind, src, resolution)  # raises before anything is created when SRC is unusable
    partial = out.with_name(out.name + ".partial")
    saved = _open_partial(partial, plan, chunk_size, force)
    pool = _start_pool(workers)
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
# Reading a prepared folder back


def _npy_header(path: Path):
    """(shape, dtype, data offset) of a .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        return shape, dtype, f.tell()


def verify_prepared(path, check_hash: bool = False) -> dict:
    """The manifest of a prepared folder, after checking that every array file exists and that its
    header and size match the manifest's counts and resolution (and, with check_hash, its sha256).
    A mismatch is a one-line DatasetError naming the file."""
    path = Path(path)
    try:
        manifest = read_json(path / "manifest.json")
    except (OSError, ValueError):
        raise DatasetError(f"{path} is not a prepared dataset (no readable manifest.json); "
                           f"make one with: python run_bench.py prepare KIND SRC --out {path}") from None
    fix = f"re-run prepare: {manifest.get('command', 'python run_bench.py prepare ...')} --force"
    r = manifest["resolution"]
    for split in manifest["splits"].values():
        n = split["written"]
        for name, shape, dtype in ((split["images"], (n, 3, r, r), np.uint8), (split["labels"], (n,), np.int64)):
            file = path / name
            if not file.is_file():
                raise DatasetError(f"{file} is missing; {fix}")
            try:
                got_shape, got_dtype, offset = _npy_header(file)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{file} is not a readable .npy file ({exc}); {fix}") from None
            if got_shape != shape or got_dtype != np.dtype(dtype):
                raise DatasetError(f"{file} holds {got_dtype} {got_shape}, the manifest says {np.dtype(dtype)} {shape}; "
                                   f"{fix}")
            size, expected = file.stat().st_size, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
            if size != expected:
                raise DatasetError(f"{file} is {size} bytes, {expected} expected (cut short or altered); {fix}")
            if check_hash and _sha256(file) != split["sha256"][name]:
                raise DatasetError(f"{file} does not match the sha256 in its manifest (altered); {fix}")
    return manifest


def load_prepared(path, split: str = "train"):
    """(uint8 memmap [N, 3, R, R], int64 labels [N]) of a prepared folder; the images stay on disk."""
    manifest = verify_prepared(path)
    if split not in manifest["splits"]:
        raise FileNotFoundError(f"{path} holds no {split} split (only {', '.join(manifest['splits'])}); "
                                'evaluate against the train split: ref_split = "train"')
    files = manifest["splits"][split]
    return np.load(Path(path) / files["images"], mmap_mode="r"), np.load(Path(path) / files["labels"])


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


# ---------------------------------------------------------------------------------------------
# Speed benchmark: python -m bench.prepare --bench


def _write_photo_like_jpegs(root: Path, n: int, wnids: int = 4, seed: int = 0) -> float:
    """ILSVRC-style tree of `n` JPEGs of ImageNet's typical size (about 400 x 350, quality 90) whose
    content compresses like a photo (smooth shapes plus grain), not like pure noise or flat colour.
    Returns the mean file size in bytes."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        w, h = int(rng.integers(380, 440)), int(rng.integers(330, 380))
        blobs = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
        arr = np.asarray(blobs.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        arr = arr + rng.normal(0, 10, (h, w, 3)).astype(np.int16)  # grain: about 85 KiB a file at quality 90
        folder = root / f"n{10000000 + i % wnids:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{folder.name}_{i}.JPEG"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes))


def _pool_startup_seconds(workers: int) -> float:
    """Seconds to start `workers` decoding processes as prepare does."""
    t = time.perf_counter()
    _start_pool(workers).shutdown()
    return time.perf_counter() - t


def speed_benchmark(n_jpegs: int = 400, workers: tuple = (1, 2), n_load: int = 2000, batch: int = 128,
                    resolution: int = 128, batches: int = 50) -> dict:
    """Print and return prepare's images/s (per worker count) and the images/s of gathering random
    training batches from a prepared images.npy memory map."""
    import tempfile

    import torch

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mean_bytes = _write_photo_like_jpegs(tmp / "src", n_jpegs)
        print(f"{n_jpegs} JPEGs, about 400x350, quality 90, mean {mean_bytes / 1024:.0f} KiB; {os.cpu_count()} CPUs")
        out["worker_startup_s"] = _pool_startup_seconds(max(workers))
        print(f"starting {max(workers)} decode workers: {out['worker_startup_s']:.2f} s (paid once per run)")
        for w in workers:
            t = time.perf_counter()
            prepare("imagenet128", str(tmp / "src"), tmp / f"out{w}", resolution, workers=w, progress=False)
            rate = n_jpegs / (time.perf_counter() - t)
            out[f"prepare_workers{w}"] = rate
            print(f"prepare, workers={w}: {rate:.0f} images/s ({rate / w:.0f} per worker; wall time incl. start-up)")
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(n_load, 3, resolution, resolution))
        images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
        images.flush()
        del images
        mm = np.load(tmp / "images.npy", mmap_mode="r")
        rng = np.random.default_rng(1)
        t = time.perf_counter()
        for _ in range(batches):
            x = torch.from_numpy(mm[np.sort(rng.choice(n_load, batch, replace=False))])
        rate = batches * batch / (time.perf_counter() - t)
        out["load_memmap"] = rate
        print(f"memmap gather, {n_load} images at {resolution} px, random sorted batches of {batch}: "
              f"{rate:.0f} images/s ({x.shape}; page cache warm)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.prepare")
    ap.add_argument("--bench", action="store_true", help="measure prepare and memmap loading speed")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    if a.bench:
        speed_benchmark(a.images, tuple(a.workers))
    else:
        ap.print_help()
