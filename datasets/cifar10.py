"""CIFAR-10 (Krizhevsky 2009): 50k train / 10k test colour 32x32 images, 10 classes.

Read through torchvision's CIFAR10 class from --data-dir (the folder holding
cifar-10-batches-py) or the cache folder, downloading there when a network is available.
"""

from pathlib import Path

import numpy as np

NAME = "cifar10"
CHANNELS = 3
RESOLUTION = 32
SOURCE = "Krizhevsky 2009; torchvision.datasets.CIFAR10"


def load(split: str, data_dir: str | None, cache_dir: Path):
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's reader. A local copy is checked for completeness, not for the official
        archive's MD5 (so a subset or a re-pickled copy can be used); a download is still
        verified by torchvision against the archive's checksum."""

        def _check_integrity(self):
            base = Path(self.root) / self.base_folder
            return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self):
            import pickle

            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    tried = []
    for root, download in ((data_dir, False), (str(cache_dir), False), (str(cache_dir), True)):
        if root is None:
            continue
        try:
            ds = (CIFAR10 if download else LocalCIFAR10)(root, train=split == "train", download=download)
        except Exception as exc:
            tried.append(f"{root} ({'download' if download else 'local copy'}: {type(exc).__name__})")
            continue
        images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        return images, np.asarray(ds.targets, dtype=np.int64)
    raise FileNotFoundError(
        "cifar10 not found; tried: " + "; ".join(tried)
        + " (put cifar-10-batches-py under --data-dir, or run where torchvision can download it)"
    )
