"""What `prepare` reads (bench/data/prepare.py's docstring describes the kinds): each source's sorted
list of items with their labels, and how to read a range of them, as a Plan of Splits whose
fingerprint lets a resumed run refuse a changed source."""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Callable

import numpy as np

from bench.errors import ConfigError, DatasetError

KINDS = ("imagenet128", "cifar10", "folder")
DEFAULT_RESOLUTION = {"imagenet128": 128, "cifar10": 32}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
WNID = re.compile(r"n\d{8}")
FLAT_NAME = re.compile(r"(n\d{8})_.+")
PARQUET_LABELS = "from the parquet label column"
UNLABELLED = "unlabelled: a flat folder, every label is -1"




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
    # torch on first use: the CLI builds the prepare parser from this module without torch
    from bench.data.loading import cache_dir, dataset_info

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


def kind_resolution(kind: str, resolution: int | None) -> int:
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
    # torch on first use: the CLI builds the prepare parser from this module without torch
    from bench.data.loading import cache_dir

    kind, src = parse_kind(kind, src)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(src).resolve().name) if kind == "folder" else kind
    return cache_dir() / "prepared" / f"{name}-{kind_resolution(kind, resolution)}"


