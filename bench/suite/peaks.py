"""The FLOPs and peaks of the cost model (bench/suite/cost.py), apart so that a suite's loading
(bench/suite/grid.py) can refuse a stated throughput above the device's dense peak (:func:`over_peak`)
without importing the cost model, which imports the suite's modules."""

from __future__ import annotations

import re

#: forward FLOPs of one image (GFLOP, multiply-add = 2) at a reference resolution, counted with
#: torch.utils.flop_counter.FlopCounterMode on the meta device (tests/test_suite.py recounts
#: adm-unet); other resolutions scale with the pixel count.
FORWARD_GFLOP = {
    "unet-micro": (12, 0.017),
    "unet-tiny": (16, 0.122),
    "ddpm-unet": (32, 12.44),
    "adm-unet": (128, 613.6),
    "dit-s/2": (32, 12.11),
    "dit-b/2": (32, 46.00),
    "dit-l/2": (32, 161.4),
    "dit-xl/2": (32, 237.2),
}

#: a training image costs its forward and a backward of twice the forward's FLOPs
TRAIN_FLOP_FACTOR = 3.0

#: dense peak TFLOP/s of one GPU by device name (vendor data sheets, without 2:4 sparsity; bf16 with
#: fp32 accumulation), matched in order against torch.cuda.get_device_name(). A device without TF32
#: or bf16 tensor cores (V100) lists fp32 alone: the others fall back to it.
DEVICE_PEAK_TFLOPS = [
    (r"\bH200\b.*\bNVL\b", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    (r"\bH200\b", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    (r"\bH100\b.*\bPCIe\b", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
    (r"\bH100\b.*\bNVL\b", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    (r"\bH100\b", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),  # SXM5 ("H100 80GB HBM3")
    (r"\bA100\b", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),  # SXM4 and PCIe alike
    (r"\bA40\b", {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7}),
    (r"\bA10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
    (r"\bL40S\b", {"fp32": 91.6, "tf32": 183.0, "bf16": 366.0}),
    (r"\bL40\b", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
    (r"\bV100\b.*\bPCIE\b", {"fp32": 14.0}),
    (r"\bV100\b", {"fp32": 15.7}),  # SXM2
]


def device_peaks(name: str) -> dict | None:
    """The dense peaks of the GPU called `name` (:data:`DEVICE_PEAK_TFLOPS`), None for one not listed."""
    return next((dict(peaks) for pattern, peaks in DEVICE_PEAK_TFLOPS if re.search(pattern, name, re.I)), None)


def peak_tflops(rates: dict, precision: str) -> float:
    """A device's peak at `precision` (fp32, tf32, bf16); fp32's where it has no faster units."""
    return float(rates.get(precision) or rates["fp32"])


def train_precision(cfg: dict) -> str:
    """The peak that bounds a run's training on a GPU: bf16 autocast (precision auto or bf16), else
    TF32 or plain fp32 by the run's tf32 flag."""
    if cfg.get("precision", "auto") in ("auto", "bf16"):
        return "bf16"
    return "tf32" if cfg.get("tf32", True) else "fp32"

def forward_gflop(arch: str, resolution: int) -> float | None:
    """One image's forward FLOPs through `arch` at `resolution` (GFLOP), None for an architecture
    the table lacks."""
    if arch not in FORWARD_GFLOP:
        return None
    ref, gflop = FORWARD_GFLOP[arch]
    return gflop * (resolution / ref) ** 2


def stated_throughput(cost: dict, arch: str) -> float | None:
    """The [cost] table's own training images/s for `arch` (the whole run), if it states one."""
    if arch in cost.get("arch_images_per_s", {}):
        return float(cost["arch_images_per_s"][arch])
    return float(cost["train_images_per_s"]) if "train_images_per_s" in cost else None


def run_resolution(cfg: dict) -> int | None:
    return cfg.get("resolution") or native_resolution(cfg["dataset"])


def over_peak(suite) -> list[tuple[str, str]]:
    """(key, reason) for each training throughput the [cost] table states above what the device's
    dense peak (device_tflops) allows: images/s per GPU x 3 x the forward's GFLOP per image."""
    rates, found, seen = suite.cost.get("device_tflops"), [], set()
    for run in suite.runs() if rates else []:
        cfg, arch = run.config, run.config["arch"]
        stated, res, precision = stated_throughput(suite.cost, arch), run_resolution(cfg), train_precision(cfg)
        gflop = forward_gflop(arch, res) if res else None
        if not (stated and gflop) or (arch, res, precision) in seen:
            continue
        seen.add((arch, res, precision))
        per_gpu = stated / int(cfg.get("gpus", 1))
        tflops, peak = per_gpu * TRAIN_FLOP_FACTOR * gflop / 1e3, peak_tflops(rates, precision)
        if tflops > peak:
            key = "cost.arch_images_per_s" if arch in suite.cost.get("arch_images_per_s", {}) else "cost.train_images_per_s"
            found.append((key, f"{arch} at {res} px: {per_gpu:g} images/s per GPU x {TRAIN_FLOP_FACTOR:g} x "
                               f"{gflop:.1f} GFLOP = {tflops:.0f} TFLOP/s, above the device's dense {precision} peak of "
                               f"{peak:g} TFLOP/s (cost.device_tflops); state what python -m bench.gpu_check "
                               "measures, or remove it to price training from FLOPs x peak x utilization"))
    return found


def native_resolution(dataset: str) -> int | None:
    try:
        # torch on first use: a dry run needs no torch
        from bench.data.loading import dataset_info

        return dataset_info(dataset).RESOLUTION
    except Exception:
        return None
