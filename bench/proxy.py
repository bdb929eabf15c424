"""A fast proxy for FID: Fréchet distance and KID in the feature space of a small CNN classifier.

The classifier is trained once by this file's deterministic code (fixed seed, fixed data order)
on the dataset's training split at the evaluation resolution, then cached under
``<cache_dir>/proxy/`` as a state_dict plus a JSON record (test accuracy, training time,
settings, SHA-1 of the weights). Features are its penultimate layer (128-d, after ReLU).

"proxy_fd" is the Fréchet distance and "proxy_kid" the KID (same estimators as bench/fid.py)
between generated and reference images in that space. They are not comparable to FID numbers
and are only comparable among themselves for the same feature extractor name and weights
(recorded in every row). Measured on Fashion-MNIST: >= 90% test accuracy at 28x28 and 16x16.

Feature scale: the features are multiplied by a fixed factor, computed once from the trained
weights and recorded with them, that makes the mean of ||f||^2 / d over the first 5000 training
images equal to 1. Without it the features' inner products (x.y / d about 2.5) would put KID's
cubic kernel (x.y / d + 1)^3 far from the regime it was designed for (Inception: about 0.13).
The factor is part of the feature space (and of the reference-statistics cache key).

Architecture (suite's own choice, "cnn-v1"): three conv3x3-BN-ReLU stages of width 32, 64, 128,
each followed by 2x2 max pooling (the last with ceil mode), flatten, Linear(.., 128), ReLU
(the features), dropout 0.2, Linear(128, classes). Training: AdamW (lr 3e-3, weight decay 5e-4),
one-cycle schedule (20% warm-up), batch 128, random horizontal flips, 4 epochs at >= 24 px,
8 epochs below (cheap, and the smaller images need them). Inputs scaled as the diffusion
models see them: x / 127.5 - 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.data import eval_cache_dir
from bench.errors import ConfigError

PROXY_VERSION = "cnn-v1"
FEATURE_DIM = 128
SHORT_NAMES = {"fashion-mnist": "fmnist"}


def proxy_name(dataset: str, resolution: int) -> str:
    """Feature extractor name recorded in result rows, e.g. "fmnist-cnn-v1-r28"."""
    return f"{SHORT_NAMES.get(dataset, dataset)}-{PROXY_VERSION}-r{int(resolution)}"


def default_epochs(resolution: int) -> int:
    return 4 if resolution >= 24 else 8


class ProxyCNN(nn.Module):
    def __init__(self, in_ch: int, resolution: int, num_classes: int = 10, width: int = 32,
                 feat_dim: int = FEATURE_DIM, dropout: float = 0.2):
        super().__init__()

        def block(ci, co):
            return [nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(in_ch, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                                  *block(2 * width, 4 * width), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten())
        side = math.ceil((resolution // 2 // 2) / 2)
        if side < 1:
            raise ConfigError(f"the proxy classifier needs images of at least 4x4, got {resolution}")
        self.fc = nn.Linear(4 * width * side * side, feat_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


def _prep(images_uint8: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def accuracy(model: ProxyCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for lo in range(0, len(images), batch_size):
        pred = model(_prep(images[lo:lo + batch_size])).argmax(1)
        correct += int((pred == labels[lo:lo + batch_size]).sum())
    return correct / len(images)


def train_proxy(train_images: torch.Tensor, train_labels: torch.Tensor, *, seed: int = 0, epochs: int | None = None,
                batch_size: int = 128, lr: float = 3e-3, verbose: bool = False) -> ProxyCNN:
    """Train the proxy classifier deterministically; leaves the global RNG state untouched."""
    n, c, h, w = train_images.shape
    if h != w:
        raise ConfigError(f"the proxy classifier expects square images, got {h}x{w}")
    epochs = epochs or default_epochs(h)
    num_classes = int(train_labels.max()) + 1
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"need at least {batch_size} training images for the proxy, got {n}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ProxyCNN(c, h, num_classes).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
        g = torch.Generator().manual_seed(seed + 1)
        t0 = time.perf_counter()
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=g)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x = _prep(train_images[idx])
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                loss = F.cross_entropy(model(x), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(f"proxy: epoch {ep + 1}/{epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return model.eval()


SCALE_IMAGES = 5000


@torch.inference_mode()
def feature_scale(model: ProxyCNN, train_images: torch.Tensor) -> float:
    """1 / sqrt(mean ||f||^2 / d) over the first SCALE_IMAGES training images (deterministic)."""
    model.eval()
    x = train_images[:SCALE_IMAGES]
    f = torch.cat([model.features(_prep(x[lo:lo + 1000])).double() for lo in range(0, len(x), 1000)])
    ms = float((f * f).sum(1).mean() / f.shape[1])
    return 1.0 / math.sqrt(ms) if ms > 0 else 1.0


def _state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


class ProxyExtractor:
    """Penultimate-layer features of the cached proxy classifier for uint8 images [N, C, H, W]."""

    def __init__(self, model: ProxyCNN, info: dict):
        self.model = model.eval()
        self.info = info
        self.scale = float(info["feature_scale"])
        self.preprocess = f"x / 127.5 - 1, no resize; features x {self.scale:.9g}"
        self.name = info["name"]
        self.weights_sha1 = info["weights_sha1"]
        self.resolution = info["resolution"]
        self.in_ch = info["in_ch"]
        self.source = f"{self.name} (test accuracy {info['test_accuracy']:.4f}, sha1 {self.weights_sha1[:12]})"

    @torch.inference_mode()
    def features(self, images, batch_size: int = 1000) -> np.ndarray:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("proxy features need a uint8 tensor [N, C, H, W] (see bench.sampling.to_uint8)")
        if images.shape[1] != self.in_ch or images.shape[2] != self.resolution or images.shape[3] != self.resolution:
            raise ValueError(f"{self.name} takes [N, {self.in_ch}, {self.resolution}, {self.resolution}] images, "
                             f"got {list(images.shape)}")
        out = [self.model.features(_prep(images[lo:lo + batch_size])).float().cpu().numpy()
               for lo in range(0, len(images), batch_size)]
        return np.concatenate(out) * np.float32(self.scale)


def proxy_paths(cache_dir, dataset: str, resolution: int, seed: int) -> tuple[Path, Path]:
    stem = f"{proxy_name(dataset, resolution)}-seed{seed}"
    folder = eval_cache_dir(cache_dir) / "proxy"
    return folder / f"{stem}.pt", folder / f"{stem}.json"


_LOADED: dict = {}


def get_proxy(dataset: str, resolution: int | None = None, *, data_dir=None, cache_dir=None,
              seed: int = 0, retrain: bool = False, verbose: bool = False) -> ProxyExtractor:
    """The proxy extractor for (dataset, resolution, seed): from memory, from the cache (weights
    checked against the recorded SHA-1), or trained now and cached."""
    from bench.data import load_dataset
    from bench.io import atomic_write

    train_x, train_y = load_dataset(dataset, split="train", data_dir=data_dir, resolution=resolution)
    res = int(train_x.shape[-1])
    pt_path, json_path = proxy_paths(cache_dir, dataset, res, seed)
    key = (str(pt_path.resolve()), seed)
    if not retrain and key in _LOADED:
        return _LOADED[key]
    if not retrain and pt_path.is_file() and json_path.is_file():
        try:
            info = json.loads(json_path.read_text())
            data = pt_path.read_bytes()
            if hashlib.sha1(data).hexdigest() == info["weights_sha1"] and info.get("version") == PROXY_VERSION:
                model = ProxyCNN(info["in_ch"], info["resolution"], info["num_classes"])
                model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
                model = model.to(memory_format=torch.channels_last)
                if "feature_scale" not in info:  # a record written before the scale existed
                    info["feature_scale"] = feature_scale(model, train_x)
                    atomic_write(json_path, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
                _LOADED[key] = ProxyExtractor(model, info)
                return _LOADED[key]
            if verbose:
                print(f"proxy: cached {pt_path.name} does not match its record; retraining", file=sys.stderr)
        except (OSError, ValueError, KeyError, RuntimeError):
            pass
    test_x, test_y = load_dataset(dataset, split="test", data_dir=data_dir, resolution=resolution)
    t0 = time.perf_counter()
    model = train_proxy(train_x, train_y, seed=seed, verbose=verbose)
    train_seconds = time.perf_counter() - t0
    acc = accuracy(model, test_x, test_y)
    data = _state_bytes(model)
    info = {"name": proxy_name(dataset, res), "version": PROXY_VERSION, "dataset": dataset, "resolution": res,
            "in_ch": int(train_x.shape[1]), "num_classes": int(train_y.max()) + 1, "seed": seed,
            "epochs": default_epochs(res), "train_images": len(train_x), "test_accuracy": acc,
            "train_seconds": round(train_seconds, 2), "threads": torch.get_num_threads(),
            "feature_scale": feature_scale(model, train_x),
            "torch": torch.__version__, "weights_sha1": hashlib.sha1(data).hexdigest()}
    if dataset == "fashion-mnist" and acc < 0.9:
        warnings.warn(f"proxy classifier for {dataset} at {res}px reached only {acc:.3f} test accuracy (< 0.90)")
    atomic_write(pt_path, lambda f: f.write(data))
    atomic_write(json_path, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    if verbose:
        print(f"proxy: trained {info['name']} in {train_seconds:.0f}s, test accuracy {acc:.4f}", file=sys.stderr)
    _LOADED[key] = ProxyExtractor(model, info)
    return _LOADED[key]
