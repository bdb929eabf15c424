"""Any prepared folder: images written once by `python run_bench.py prepare folder:PATH --resolution R`
(or by prepare imagenet128 / cifar10 at any resolution), read from --data-dir.

RESOLUTION is 0, meaning "as prepared": the true side is the manifest's `resolution` (the registry
needs a number to show). Labels come from class subfolders, or are all -1 for a flat folder. The
images come back as a read-only memory map. Only a cifar10 preparation has a test split; otherwise
evaluation compares against the train split (ref_split = "train").
"""

from pathlib import Path

NAME = "folder"
CHANNELS = 3
RESOLUTION = 0  # as prepared: see the folder's manifest.json
SOURCE = "your images; python run_bench.py prepare folder:PATH --resolution R --out DIR, then --data-dir DIR"


def load(split: str, data_dir: str | None, cache_dir: Path):
    from bench.data.prepared import load_prepared

    if not data_dir:
        raise FileNotFoundError("dataset folder reads a prepared folder: run python run_bench.py prepare "
                                "folder:PATH --resolution R --out DIR, then pass --data-dir DIR")
    if not (Path(data_dir) / "manifest.json").exists():
        raise FileNotFoundError(f"{data_dir} is not a prepared folder (no manifest.json); run python run_bench.py "
                                f"prepare folder:PATH --resolution R --out {data_dir} first")
    return load_prepared(data_dir, split)
