"""The paper suites' evaluation path at CPU size, with the relations of their sizes kept (issue 27):
ref-stats, run and report where the noise floor has no real images to be computed from. The path's
other parts: reference statistics over shards and Inception's batches in test_fid.py, the sampler's
schedule on the device and its batch sized to fit (halved on out-of-memory) in test_sampling.py."""

import re

import numpy as np
import pytest
from conftest import needs_inception

from bench.cli import main
from bench.eval.evaluate import Evaluator
from bench.eval.reference import prepare_references

# paper-cifar10's shape: FID-50k (N) against the whole train split (50,000) as the reference, where
# the test split (10,000) holds fewer than N, and a training job computes at most 10,000 images'
# features (bench.eval.reference.TRAIN_COMPUTE_LIMIT). Here: synthetic's 512 train and 256 test images,
# N = 300 and 400 (fid_final), a limit of 256.
LIMIT = 256
FLOORLESS = """
[suite]
name = "floorless"
description = "paper-cifar10's evaluation shape at CPU size"

[grid]
methods = ["baseline"]
datasets = ["synthetic"]
archs = ["unet-tiny"]
seeds = [0]

[budget]
iters = 2
batch_size = 8

[train]
lr = 1e-3
warmup = 0
ckpt_every = 2

[eval]
every = 2
metrics = ["proxy_fd"]
num_images = 300
final_num_images = 400
num_ref = "all"
ref_split = "train"
sampler_steps = 1
batch_size = 400

[report]
metric = "proxy_fd"
baseline = "baseline"
bootstrap = 50
"""


def test_a_floor_without_real_images_is_cached_and_reported(tmp_path, monkeypatch, capsys, fresh_datasets):
    """ref-stats, then run, then report, as a user runs them: the floor that cannot be computed
    (N above the test split, the whole train split the reference) is recorded by ref-stats as such,
    the training job proceeds, and the report says why there is no floor."""
    import bench.train.loop as loop

    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loop, "TRAIN_COMPUTE_LIMIT", LIMIT)
    suite = tmp_path / "floorless.toml"
    suite.write_text(FLOORLESS)
    results = str(tmp_path / "results")

    assert main(["ref-stats", str(suite), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all("512 reference images" in line for line in lines), out
    for n, line in zip((300, 400), lines):
        assert re.search(rf"noise floor at N = {n}: not computable: N = {n} real images are needed, the reference is "
                         r"all 512 train images, and the test split holds 256 \(recorded; the runs go on", line), line
    assert main(["ref-stats", str(suite), "--device", "cpu"]) == 0  # now every part of it is read back
    assert capsys.readouterr().out.count("(cached); noise floor at N = ") == 2

    assert main(["--results", results, "run", str(suite)]) == 0, capsys.readouterr().err[-2000:]
    report = (tmp_path / "results" / "floorless" / "report.md").read_text()
    assert re.search(r"\*\*Noise floor\*\*: not computed: N = 300 real images are needed, the reference is all 512 "
                     r"train images, and the test split holds 256\.", report), report
    capsys.readouterr()
    assert main(["--results", results, "report", str(suite)]) == 0
    assert "**Noise floor**: not computed: N = 300" in (tmp_path / "results" / "floorless" / "report.md").read_text()


def test_a_measurable_floor_is_still_refused_above_the_limit_when_not_cached(tmp_path):
    """The floor that can be computed from real images keeps the training job's limit: not cached
    and above it, one line naming ref-stats (the floorless case above is no way around it)."""
    from bench.errors import ConfigError

    spec = {"dataset": "synthetic", "metrics": ["proxy_fd"], "num_images": 200, "num_ref": "all",
            "ref_split": "test", "sampler_steps": 1, "cache_dir": str(tmp_path / "cache")}
    prepare_references([{**spec, "num_images": 2}], device="cpu")  # the reference (all 256 test images) only
    with pytest.raises(ConfigError, match=r"^the noise floor at N = 200 .* run `python run_bench.py ref-stats"):
        Evaluator(spec, compute_limit=100).prepare()
    rows = prepare_references([spec], device="cpu")
    assert rows[0]["floor"].endswith("between 200 real train images and the reference (computed)")
    ev = Evaluator(spec, compute_limit=100)
    ev.prepare()
    assert ev.prepared_families["proxy"][2]["state"] == "cached"


IMAGENET_SHAPED = """
[suite]
name = "no-test-split"
description = "paper-imagenet128's evaluation shape at CPU size"

[grid]
methods = ["baseline"]
datasets = [{{ name = "imagenet128", flip = true, data_dir = "{data}" }}]
archs = ["dit-s/8"]
seeds = [0]

[budget]
iters = 2
batch_size = 4

[train]
class_cond = true
lr = 1e-4
warmup = 0
ckpt_every = 2

[eval]
every = 2
metrics = ["fid"]
num_images = 8
final_num_images = 10
num_ref = "all"
ref_split = "train"
sampler_steps = 1
batch_size = 10

[report]
metric = "fid"
baseline = "baseline"
bootstrap = 50
"""


@pytest.mark.slow
@needs_inception
def test_a_dataset_without_a_test_split_runs_to_its_report(tmp_path, monkeypatch, capsys, fresh_datasets):
    """paper-imagenet128's shape: no test split at all, the reference the whole train split (12
    ILSVRC-shaped images here, 1.28M there), N above a training job's limit (6 here, 10,000 there)."""
    from PIL import Image

    import bench.train.loop as loop
    from bench.data.prepare import prepare

    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loop, "TRAIN_COMPUTE_LIMIT", 6)
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537", "n01484850"):
        (tmp_path / "ilsvrc" / wnid).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)).save(
                tmp_path / "ilsvrc" / wnid / f"{wnid}_{i}.JPEG")
    data = prepare("imagenet128", str(tmp_path / "ilsvrc"), tmp_path / "prepared", workers=1, progress=False)
    suite = tmp_path / "no-test-split.toml"
    suite.write_text(IMAGENET_SHAPED.format(data=data))
    results = str(tmp_path / "results")

    assert main(["ref-stats", str(suite), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("not computable: N = ") == 2 and "and there is no test split (recorded" in out, out
    assert main(["--results", results, "run", str(suite)]) == 0, capsys.readouterr().err[-2000:]
    report = (tmp_path / "results" / "no-test-split" / "report.md").read_text()
    assert ("**Noise floor**: not computed: N = 8 real images are needed, the reference is all 12 train images, "
            "and there is no test split.") in report
