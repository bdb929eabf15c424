"""Fashion-MNIST (Xiao et al. 2017): 60k train / 10k test grey 28x28 images, 10 classes.

Looked for, in order: --data-dir (idx .gz or raw files, or torchvision's FashionMNIST/raw
layout), the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist),
torchvision's download into the cache folder (needs a network).
"""

import gzip
from pathlib import Path

import numpy as np

NAME = "fashion-mnist"
CHANNELS = 1
RESOLUTION = 28
SOURCE = "Xiao et al. 2017; Debian dataset-fashion-mnist or torchvision"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic, dims as big-endian int32, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in (".gz", ""):
            p = folder / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


def _from_folder(folder: Path, split: str):
    img, lab = (_find(folder, s) for s in FILES[split])
    if img is None or lab is None:
        return None
    return read_idx(img)[:, None], read_idx(lab).astype(np.int64)


def load(split: str, data_dir: str | None, cache_dir: Path):
    """Return (uint8 [N,1,28,28], int64 [N]) or raise FileNotFoundError naming every place tried."""
    tried = []
    if data_dir:
        out = _from_folder(Path(data_dir), split)
        if out is not None:
            return out
        tried.append(f"--data-dir {data_dir} (no {FILES[split][0]}[.gz] there)")
    out = _from_folder(DEBIAN_DIR, split)
    if out is not None:
        return out
    tried.append(f"{DEBIAN_DIR} (install it: apt-get install dataset-fashion-mnist)")
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache_dir), train=split == "train", download=True)
        out = _from_folder(cache_dir, split)
        if out is not None:
            return out
    except Exception as exc:  # no network, most often
        tried.append(f"torchvision download into {cache_dir} ({type(exc).__name__}: {str(exc)[:80]})")
    raise FileNotFoundError("fashion-mnist not found; tried: " + "; ".join(tried))
