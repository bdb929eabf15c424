"""Training on a prepared set (bench/data/prepare.py): read through the memory map, never copied into
memory; class conditioning needs its labels."""

import re

import numpy as np
import pytest
from PIL import Image

from bench.errors import ConfigError
from bench.train.loop import TrainConfig, setup, train


def make_folder(root, classes=("cats", "dogs"), per_class=6, size=(20, 14)):
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(per_class):
            d = root / c if c else root
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{c}{i}.png")
    return root


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (Linux /proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.fixture
def prepared(tmp_path):
    from bench.data.prepare import prepare

    return prepare("folder", str(make_folder(tmp_path / "src")), tmp_path / "prep", resolution=8, workers=1,
                   progress=False)


def test_training_reads_a_prepared_set_in_place(prepared, tmp_path, fresh_datasets):
    from bench.data.loading import is_memory_mapped
    from bench.train.resolve import resolve_run

    cfg = TrainConfig(dataset="folder", data_dir=str(prepared), arch="unet-micro", iters=3, batch_size=4,
                      class_cond=True)
    state = setup(cfg, resolve_run(cfg).method)
    assert is_memory_mapped(state.images) and state.images.device.type == "cpu"
    # The training set is the file's pages: its memory lies in a mapping of images.npy (no copy).
    assert state.images.shape == (12, 3, 8, 8)
    assert mapped_file(state.images.data_ptr()) == str((prepared / "images.npy").resolve())
    # ... and training on it runs, with its labels (2 classes from the subfolders).
    assert state.num_classes == 2 and state.labels.tolist() == [0] * 6 + [1] * 6
    status = train(cfg, tmp_path / "run")
    assert status["state"] == "done"


def test_class_conditioning_on_a_set_without_labels_is_one_error_line(tmp_path, fresh_datasets):
    from bench.data.prepare import prepare

    flat = prepare("folder", str(make_folder(tmp_path / "src", classes=("",))), tmp_path / "prep", resolution=8,
                   workers=1, progress=False)
    cfg = TrainConfig(dataset="folder", data_dir=str(flat), arch="unet-micro", iters=2, batch_size=4, class_cond=True)
    with pytest.raises(ConfigError, match="has no class labels"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_resolution_other_than_the_prepared_one_is_refused(prepared):
    from bench.data.loading import load_dataset
    from bench.errors import DatasetError

    with pytest.raises(DatasetError, match="prepared at 8 px.*--resolution 16"):
        load_dataset("folder", "train", str(prepared), 16)


@pytest.mark.parametrize("arch, resolution, what", [
    ("dit-s/2", 15, "divisible by its patch size 2"),
    ("dit-h/2", None, "unknown architecture 'dit-h/2'"),
])
def test_a_network_that_cannot_take_the_data_is_refused_before_anything_is_written(tmp_path, arch, resolution, what):
    cfg = TrainConfig(dataset="synthetic", arch=arch, resolution=resolution, iters=1, batch_size=2)
    with pytest.raises(ConfigError, match=what):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("metrics, ref_split, what", [
    (["proxy_fd"], "train", r"^eval: proxy metrics check their classifier on the test split, and folder \(.*prep\) "
                            r"has no test split; evaluate it with metrics = \[\"fid\"\]$"),
    (["fid"], "test", r"^eval: ref_split = \"test\", and folder \(.*prep\) has no test split; "
                      r"set ref_split = \"train\"$"),
])
def test_an_evaluation_on_a_split_the_set_lacks_is_refused_before_training(prepared, tmp_path, metrics, ref_split,
                                                                             what, fresh_datasets):
    cfg = TrainConfig(dataset="folder", data_dir=str(prepared), arch="unet-micro", iters=2, batch_size=4,
                      eval={"metrics": metrics, "ref_split": ref_split, "num_images": 4})
    with pytest.raises(ConfigError, match=what):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_evaluation_check_names_missing_data_as_such_and_can_leave_nothing_cached(prepared, tmp_path,
                                                                                     fresh_datasets):
    from bench.data.loading import load_dataset
    from bench.errors import DatasetError
    from bench.eval.evaluate import check_eval_data

    # A dataset that is not there at all gets the loader's own message, not "has no test split".
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path / 'absent'))} is not a prepared folder "
                                           r"\(no manifest\.json\); run python run_bench\.py prepare") as info:
        check_eval_data({"dataset": "folder", "data_dir": str(tmp_path / "absent"), "metrics": ["proxy_fd"]})
    assert "has no" not in str(info.value) and "absent" in str(info.value)
    # A process that never evaluates (a rank > 0) checks without keeping the split in memory.
    assert load_dataset.cache_info().currsize == 0  # (fresh_datasets) so 0 below is cache=False's doing
    check_eval_data({"dataset": "folder", "data_dir": str(prepared), "metrics": ["fid"], "resolution": 8},
                    cache=False)
    assert load_dataset.cache_info().currsize == 0
    check_eval_data({"dataset": "folder", "data_dir": str(prepared), "metrics": ["fid"], "resolution": 8})
    assert load_dataset.cache_info().currsize == 1
