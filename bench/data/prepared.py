"""Reading a prepared folder back (written by bench/data/prepare.py): its manifest checked against the
array files, and the images as a read-only memory map."""

import hashlib
from pathlib import Path

import numpy as np

from bench.errors import DatasetError
from bench.fileio import read_json


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()



def npy_header(path: Path):
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
                got_shape, got_dtype, offset = npy_header(file)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{file} is not a readable .npy file ({exc}); {fix}") from None
            if got_shape != shape or got_dtype != np.dtype(dtype):
                raise DatasetError(f"{file} holds {got_dtype} {got_shape}, the manifest says {np.dtype(dtype)} {shape}; "
                                   f"{fix}")
            size, expected = file.stat().st_size, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
            if size != expected:
                raise DatasetError(f"{file} is {size} bytes, {expected} expected (cut short or altered); {fix}")
            if check_hash and file_sha256(file) != split["sha256"][name]:
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


