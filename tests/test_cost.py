"""The dry run's GPU pricing (bench/suite/cost.py): no stated throughput above the device's dense peak,
training from FLOPs x peak x utilization, and a GPU check's measurements in their place."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from bench.suite.cost import describe_plan, device_peaks, run_cost, with_gpu_check
from bench.suite.grid import load_suite
from bench.suite.schema import SuiteError


def adm_forward_flops() -> int:
    """adm-unet's forward FLOPs for one class-conditional 128 px image, counted here (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models.networks import build_model

    with torch.device("meta"):
        net = build_model("adm-unet", 3, 128, num_classes=1000)
        with FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 3, 128, 128), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops()


def imagenet_variant(tmp_path, cost_line: str):
    """paper-imagenet128 as shipped, with one more [cost] line."""
    text = (REPO / "suites" / "paper-imagenet128.toml").read_text().replace("[cost]\n", f"[cost]\n{cost_line}\n")
    path = tmp_path / "variant.toml"
    path.write_text(text)
    return path


def test_a_stated_throughput_above_the_dense_peak_is_refused(tmp_path):
    """The figure paper-imagenet128 used to ship: 1,600 images/s on 8 A100s is 200 per GPU x 3 x 613.6
    GFLOP = 368 TFLOP/s, above the A100's dense bf16 312. 800 (184 TFLOP/s per GPU) loads."""
    with pytest.raises(SuiteError, match=r"key 'cost.arch_images_per_s': adm-unet at 128 px: 200 images/s per GPU "
                                         r"x 3 x 613.6 GFLOP = 368 TFLOP/s, above the device's dense bf16 peak of "
                                         r"312 TFLOP/s"):
        load_suite(imagenet_variant(tmp_path, 'arch_images_per_s = { "adm-unet" = 1600.0 }'))
    ok = load_suite(imagenet_variant(tmp_path, 'arch_images_per_s = { "adm-unet" = 800.0 }'))
    assert run_cost(ok, ok.runs()[0]).train_s == pytest.approx(400_000 * 256 / 800)


def test_paper_imagenet128s_training_is_priced_from_flops_peak_and_utilization():
    """Counted here: 3 x the forward's FLOPs per training image at the suite's bf16 peak x utilization x
    8 GPUs. The table's 613.6 GFLOP is the count rounded to 0.1 GFLOP: 1e-4 relative at most."""
    s = load_suite("paper-imagenet128")
    run = s.runs()[0]
    per_image = 3 * adm_forward_flops()
    rate = s.cost["device_tflops"]["bf16"] * 1e12 * s.cost["utilization"] * 8 / per_image  # images/s, 8 GPUs
    assert run_cost(s, run).train_s == pytest.approx(400_000 * 256 / rate, rel=1e-4)
    assert 55 < rate / 8 < 65 and 55 * 3600 < run_cost(s, run).train_s < 65 * 3600  # the issue's ~59/GPU, ~60 h
    text = describe_plan(s)
    assert f"= {rate / 8:,.1f} images/s per GPU x 8 GPUs" in text
    assert re.search(r"adm-unet at 128 px, bf16: 3 x 613.6 GFLOP per image at 312 TFLOP/s x 0.35 utilization", text)


def test_no_shipped_gpu_suite_states_a_throughput_above_its_peak():
    """Every shipped suite with device_tflops loads (the check runs at load) and its training is
    within 100% of peak by construction: FLOP-priced at its utilization."""
    for name in ("paper-cifar10", "paper-imagenet128", "archs-cifar10"):
        s = load_suite(name)
        assert "device_tflops" in s.cost and not {"arch_images_per_s", "train_images_per_s"} & set(s.cost), name


def test_device_peaks_by_name():
    """torch's names for the GPUs: dense peaks, the most specific entry first."""
    assert device_peaks("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert device_peaks("NVIDIA A100 80GB PCIe")["tf32"] == 156.0
    assert device_peaks("NVIDIA H100 80GB HBM3")["bf16"] == 989.4
    assert device_peaks("NVIDIA H100 PCIe")["bf16"] == 756.5
    assert device_peaks("NVIDIA H200")["bf16"] == 989.4
    assert device_peaks("NVIDIA L40S")["bf16"] == 366.0 and device_peaks("NVIDIA L40")["bf16"] == 181.0
    assert device_peaks("Tesla V100-SXM2-32GB") == {"fp32": 15.7}
    assert device_peaks("NVIDIA A10G") is None and device_peaks("cpu") is None  # not listed: no utilization


def gpu_check_file(tmp_path) -> str:
    """A gpu_check.json as python -m bench.gpu_check writes it, with made-up H100 measurements."""
    data = {"environment": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "gpus": 1, "torch": "x", "cuda": "x"},
            "throughput": [{"network": "adm-unet", "setting": "bf16", "precision": "bf16", "resolution": 128,
                            "batch": 32, "images_per_s": 150.0},
                           {"network": "dit-xl/2", "setting": "bf16", "precision": "bf16", "resolution": 32,
                            "error": "out of memory"}],
            "sampling": [{"network": "adm-unet", "precision": "bf16", "resolution": 128, "network_evals_per_s": 400.0}],
            "inception": {"batch": 500, "images_per_s": 2000.0}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_gpu_check_file_prices_the_dry_run(tmp_path):
    """Measured rates per GPU x the run's 8 GPUs replace the FLOP model: training images, network
    evaluations and Inception images over their rates (plus the CPUs' resize, not measured)."""
    s = with_gpu_check(load_suite("paper-imagenet128"), gpu_check_file(tmp_path))
    c = run_cost(s, s.runs()[0])
    images = 8 * 10_000 + 50_000
    assert c.train_s == pytest.approx(400_000 * 256 / (150.0 * 8))
    assert c.sample_s == pytest.approx(images * 100 / (400.0 * 8))
    assert c.feature_s == pytest.approx(images / (2000.0 * 8) + images / s.cost["resize_images_per_s"])
    text = describe_plan(s)
    assert "estimated time on NVIDIA H100 80GB HBM3 (measured by the GPU check" in text
    assert "adm-unet at 128 px, bf16: 150.0 images/s per GPU x 8 GPUs (measured)" in text


def test_the_run_command_prices_a_dry_run_from_a_gpu_check(tmp_path):
    """`run --dry-run --gpu-check FILE`; without --dry-run, or with a file that is not a check's, one
    error line and nothing written."""
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "run_bench.py"), "--results", str(tmp_path / "results"),
                               "run", "paper-imagenet128", *args], capture_output=True, text=True, timeout=900)

    ok = run("--dry-run", "--gpu-check", gpu_check_file(tmp_path))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "150.0 images/s per GPU x 8 GPUs (measured)" in ok.stdout
    (tmp_path / "bad.json").write_text('{"throughput": []}')
    for args, says in ((["--gpu-check", gpu_check_file(tmp_path)], "prices a dry run; add --dry-run"),
                       (["--dry-run", "--gpu-check", str(tmp_path / "bad.json")], "not a GPU check's file")):
        r = run(*args)
        assert r.returncode != 0 and r.stderr.startswith("error:") and says in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
