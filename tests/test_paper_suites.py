"""The GPU suites paper-imagenet128 and archs-cifar10, run at CPU size on generated data: the
suite files as shipped, with only the budget, the grid's size, the evaluation's N and the data
location changed, through the runner and the report. A checkpoint holds four copies of the weights
(weights, EMA, AdamW's two moments): DiT-B/2's is 2 GB, so the suites run their smaller networks
and build the others on the meta device; each run checkpoints once, at its end."""

import re

import numpy as np
import pytest
from conftest import REPO, needs_inception
from PIL import Image

from bench.report.build import build_report
from bench.suite.grid import load_suite
from bench.suite.runner import run_suite

# System tests: whole GPU suites at CPU size (the slow tier); both suites evaluate a real FID.
pytestmark = [pytest.mark.slow, needs_inception]


def cpu_variant(name: str, tmp_path, data: str, archs: str, methods: str = '["baseline", "clts"]') -> object:
    """suites/<name>.toml with CPU sizes: 2 iterations of batch 4, `methods`, one seed, one FID of 4
    images at the end (and 6 for fid_final), one checkpoint, one process, no Slurm table."""
    text = (REPO / "suites" / f"{name}.toml").read_text()
    for pattern, value in ((r'^name = .*$', f'name = "{name}-cpu"'),
                           (r'^methods = .*$', f"methods = {methods}"),
                           (r'^datasets = .*$', f"datasets = [{data}]"),
                           (r'^archs = .*$', f"archs = {archs}"),
                           (r'^seeds = .*$', "seeds = [0]"),
                           (r'^iters = .*$', "iters = 2"),
                           (r'^batch_size = (128|256) .*$|^batch_size = (128|256)$', "batch_size = 4"),
                           (r'^gpus = .*$', "gpus = 1"),
                           (r'^ckpt_every = .*$', "ckpt_every = 2"),
                           (r'^every = .*$', "every = 2"),
                           (r'^num_images = .*$', "num_images = 4"),
                           (r'^final_num_images = .*$', "final_num_images = 6"),
                           (r'^sampler_steps = .*$', "sampler_steps = 1"),
                           (r'^batch_size = 500.*$', "batch_size = 8")):
        text, n = re.subn(pattern, value, text, flags=re.M)
        assert n >= 1, pattern  # the shipped suite still has this key
    text = text[:text.index("[slurm]")]
    path = tmp_path / f"{name}-cpu.toml"
    path.write_text(text)
    return load_suite(path)


def test_paper_imagenet128_at_cpu_size(tmp_path, monkeypatch, fresh_datasets):
    from bench.data.prepare import prepare

    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537", "n01484850"):
        (tmp_path / "ilsvrc" / wnid).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)).save(
                tmp_path / "ilsvrc" / wnid / f"{wnid}_{i}.JPEG")
    prepared = prepare("imagenet128", str(tmp_path / "ilsvrc"), tmp_path / "prepared", workers=1, progress=False)
    # ADM itself (421M parameters) is not CPU-sized: the smallest DiT stands in for it.
    suite = cpu_variant("paper-imagenet128", tmp_path, f'{{ name = "imagenet128", flip = true, data_dir = "{prepared}" }}',
                        '["dit-s/8"]')
    run = suite.runs()[0]
    assert run.config["class_cond"] and run.config["eval"]["num_ref"] == "all"
    result = run_suite(suite, results_root=tmp_path / "results", progress=False)
    assert result.ok, [(o.key, o.reason) for o in result.outcomes]
    report = build_report(tmp_path / "results" / suite.name).read_text()
    assert "fid_final" in report and "class-conditional, image i labelled i mod 3" in report
    # FID at the end of the budget is one number per run: final values and paired differences, no speed-up.
    assert "### fid_final: the end of the budget" in report and "speed-up over `baseline` (fid_final)" not in report
    assert "fid_final at fractions" not in report
    evals = (tmp_path / "results" / suite.name / "tables" / "evaluations.csv").read_text()
    assert "fid_final" in evals


def test_archs_cifar10_at_cpu_size(tmp_path, monkeypatch, fresh_datasets):
    from bench.core.config import TrainConfig
    from bench.tools.gpu_check import write_cifar_like
    from bench.train.loop import check_data_and_network

    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    data = write_cifar_like(tmp_path / "cifar", 40, 10)
    dataset = f'{{ name = "cifar10", resolution = 32, flip = true, data_dir = "{data}" }}'
    shipped = cpu_variant("archs-cifar10", tmp_path, dataset, '["ddpm-unet", "dit-s/2", "dit-b/2"]',
                          methods='["baseline"]')
    assert {w.name for w in shipped.workloads} == {"cifar10-32_ddpm-unet", "cifar10-32_dit-s-2", "cifar10-32_dit-b-2"}
    for run in shipped.runs():  # every network of the grid fits the data (built on the meta device)
        check_data_and_network(TrainConfig.from_dict(run.config))
    suite = cpu_variant("archs-cifar10", tmp_path, dataset, '["ddpm-unet", "dit-s/2"]', methods='["baseline"]')
    result = run_suite(suite, results_root=tmp_path / "results", progress=False)
    assert result.ok, [(o.key, o.reason) for o in result.outcomes]
    report = build_report(tmp_path / "results" / suite.name).read_text()
    for arch in ("ddpm-unet", "dit-s-2"):
        assert arch in report
