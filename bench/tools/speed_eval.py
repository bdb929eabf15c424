"""Benchmark of the evaluation paths: ``python -m bench.tools.speed_eval [--num 1000]``.

On the same images in one run it measures
  1. our in-memory FID path (uint8 tensors -> clean-fid's resize -> Inception, channels_last),
  2. clean-fid's own folder path (PNGs -> compute_fid(dir_a, dir_b, mode="clean") with
     clean-fid's InceptionV3W on the same weights; num_workers=0, batch_size 32, clean-fid's default),
  3. the proxy's feature extraction (bench/eval/proxy.py),
and checks that 1 and 2 give the same FID (< 1e-3). Set A is `num` test images and set B `num`
training images of the dataset (real images stand in for generated ones: the cost is the same).
Images/s counts every image passed through the network (2 * num per FID). Writing the PNGs for
route 2 is timed separately. Prints a JSON report and writes it to --out if given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.core.perf import tune_allocator
from bench.data.loading import load_dataset
from bench.eval import fid as F
from bench.eval import inception as I
from bench.eval.proxy import get_proxy
from bench.eval.sampling import save_pngs
from bench.fileio import atomic_write_bytes


def folder_route(tmp: Path) -> tuple[float, float]:
    """clean-fid's own compute_fid on the PNG folders tmp/a and tmp/b (weights in tmp/w)."""
    from cleanfid import fid as cf
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(tmp / "w"), download=False).eval()
    t = time.perf_counter()
    value = float(cf.compute_fid(str(tmp / "a"), str(tmp / "b"), mode="clean", custom_feat_extractor=model,
                                 num_workers=0, batch_size=32, device=torch.device("cpu"), verbose=False))
    return value, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.speed_eval", description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=1000, help="images per set (default 1000)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch-size", type=int, default=50, help="batch of our in-memory path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache-dir", default=None, help="where the proxy classifier is cached (default $DIFFBENCH_CACHE/eval)")
    ap.add_argument("--no-folder", action="store_true", help="skip clean-fid's folder route (the slow one)")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--folder-route", metavar="DIR", help=argparse.SUPPRESS)  # the child process of route 2
    args = ap.parse_args(argv)
    if args.folder_route:
        print(json.dumps(folder_route(Path(args.folder_route))))
        return {}

    allocator = tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)

    test_x, _ = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    train_x, _ = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    n = min(args.num, len(test_x), len(train_x))
    a = test_x[:n]
    b = train_x[F.select_subset(len(train_x), n, 0)] if n < len(train_x) else train_x
    report = {"dataset": args.dataset, "num_per_set": n, "resolution": int(a.shape[-1]),
              "threads": torch.get_num_threads(), "allocator_tuned": allocator, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}

    t = time.perf_counter()
    ext = I.InceptionExtractor(batch_size=args.batch_size)
    report["inception_weights"] = ext.source
    report["inception_load_seconds"] = round(time.perf_counter() - t, 2)
    fa, fb = _in_memory(ext, a, b, report)
    _frechet(fa, fb, report)
    if not args.no_folder:
        _cleanfid_folder(ext, a, b, report)
    _proxy(args, a, b, report)
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_bytes(Path(args.out), (json.dumps(report, indent=2) + "\n").encode())
    return report


def _in_memory(ext, a, b, report: dict):
    """1. Our in-memory path: uint8 -> clean-fid's resize -> Inception in micro-batches."""
    n = len(a)
    t = time.perf_counter()
    fa, fb = ext.features(a), ext.features(b)
    t_feat = time.perf_counter() - t
    t = time.perf_counter()
    fid_ours = F.fid_from_feats(fa, fb)
    t_fd = time.perf_counter() - t
    report["in_memory"] = {"fid": fid_ours, "seconds": round(t_feat + t_fd, 2), "frechet_seconds": round(t_fd, 3),
                           "images_per_s": round(2 * n / (t_feat + t_fd), 2)}
    print(f"in-memory: FID {fid_ours:.4f}, {2 * n / (t_feat + t_fd):.1f} images/s", file=sys.stderr)
    return fa, fb


def _frechet(fa, fb, report: dict) -> None:
    """The Fréchet distance: our eigenvalue route vs clean-fid's scipy sqrtm on the same statistics."""
    from cleanfid.fid import frechet_distance as cf_frechet

    mu1, s1 = F.feature_stats(fa)
    mu2, s2 = F.feature_stats(fb)
    t = time.perf_counter()
    eigen = F.frechet_distance(mu1, s1, mu2, s2)
    t_eigen = time.perf_counter() - t
    t = time.perf_counter()
    fd_sqrtm = float(cf_frechet(mu1, s1, mu2, s2))
    report["frechet"] = {"eigen": eigen, "scipy_sqrtm": fd_sqrtm,
                         "sqrtm_seconds": round(time.perf_counter() - t, 3), "eigen_seconds": round(t_eigen, 3)}


def _cleanfid_folder(ext, a, b, report: dict) -> None:
    """2. clean-fid's folder path on the same images as PNGs, as a user runs it: a fresh process
    with the allocator left alone."""
    n = len(a)
    with tempfile.TemporaryDirectory(prefix="speed_eval_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        save_pngs(a, tmp / "a")
        save_pngs(b, tmp / "b")
        t_png = time.perf_counter() - t
        I.export_cleanfid_layout(ext.weights, tmp / "w")
        child = subprocess.run([sys.executable, "-m", "bench.tools.speed_eval", "--folder-route", str(tmp)],
                               env={**os.environ, "DIFFBENCH_NO_MALLOPT": "1"}, capture_output=True, text=True,
                               check=True)
        fid_cf, t_cf = json.loads(child.stdout.strip().splitlines()[-1])
    ours = report["in_memory"]
    report["cleanfid_folder"] = {"allocator_tuned": False, "fid": fid_cf, "seconds": round(t_cf, 2),
                                 "png_write_seconds": round(t_png, 2), "images_per_s": round(2 * n / t_cf, 2)}
    report["fid_abs_diff"] = abs(ours["fid"] - fid_cf)
    report["fid_match"] = report["fid_abs_diff"] < 1e-3
    report["speedup"] = round(t_cf / ours["seconds"], 2)
    print(f"clean-fid folder: FID {fid_cf:.4f}, {2 * n / t_cf:.1f} images/s; |diff| {report['fid_abs_diff']:.2e}",
          file=sys.stderr)


def _proxy(args, a, b, report: dict) -> None:
    """3. The proxy feature extractor (shipped for the dataset's own resolution where there is one)."""
    px = get_proxy(args.dataset, int(a.shape[-1]), data_dir=args.data_dir, cache_dir=args.cache_dir)
    px.features(a[:16])  # warm-up
    t = time.perf_counter()
    pa, pb = px.features(a), px.features(b)
    t_px = time.perf_counter() - t
    report["proxy"] = {"name": px.name, "test_accuracy": px.info["test_accuracy"], "shipped": px.shipped,
                       "images_per_s": round(2 * len(a) / t_px, 1), "proxy_fd": F.fid_from_feats(pa, pb)}


if __name__ == "__main__":
    main()
