import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Tests never write into the user's cache.
os.environ.setdefault("DIFFBENCH_CACHE", str(REPO / ".pytest_cache" / "diffbench-cache"))

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian dataset-fashion-mnist not installed (./setup.sh installs it)")
