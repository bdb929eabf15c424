"""A fast proxy for FID: Fréchet distance and KID in the feature space of a small CNN classifier.

Shipped, pinned weights. The classifier is trained by this file's deterministic code (fixed seed, fixed data order),
but "deterministic" holds only on one machine: different CPUs, thread counts and torch builds round floating-point sums
differently, so training the same code on two machines ends with different weights, and then proxy_fd / proxy_kid
differ between the machines for the same generated images. So the extractors the shipped suites use are trained once
and committed under ``bench/eval/proxy_weights/`` (``<name>-seed<seed>.pt``: the state_dict bytes; ``.json``: the
training record: test accuracy, feature scale, settings, SHA-1 and SHA-256 of the weights), and each .pt file's SHA-256
is pinned in SHIPPED below, like Inception's weights in bench/eval/inception.py. Loading a shipped extractor needs no
dataset; a file that does not match its pin is an error (restore it with ``git checkout bench/eval/proxy_weights``),
never a silent retraining, which would quietly change the feature space. Shipped: Fashion-MNIST at 12 (the embedded
default's), 16 and 28 px, the synthetic test dataset at 16 px, all seed 0.

Only a (dataset, resolution, seed) without a shipped extractor is trained here, on the dataset's training split at the
evaluation resolution, and cached under ``<cache_dir>/proxy/`` with the same kind of record; its numbers are then only
comparable with rows that carry the same weights_sha256 (recorded in every row). Features are the penultimate layer
(128-d, after ReLU). Trained once per cache, under a lock: concurrent jobs (a grid, DDP ranks) wait for the first one
and load its files; on the GPU when there is one. A dataset without a test split (imagenet128) holds out a tenth of its
train split (at most HELD_OUT_MAX images, by a fixed permutation) to check the accuracy on, rather than check it on
images it trained on (record: accuracy_split, held_out_images); one with a test split trains on all its training
images, as it always did. REPA's teacher is this architecture trained with its own seed and cached under its own name
(bench/eval/teacher.py), never the extractor these metrics load. To ship a new extractor: ``get_proxy(dataset, res,
seed=seed, cache_dir=<tmp>, retrain=True)``, copy the two files from ``<tmp>/proxy/`` into bench/eval/proxy_weights/,
and pin the .pt's SHA-256 (the record's weights_sha256) in SHIPPED.

"proxy_fd" is the Fréchet distance and "proxy_kid" the KID (same estimators as bench/eval/fid.py) between generated and
reference images in that space. They are not comparable to FID numbers and are only comparable among themselves for the
same feature extractor name and weights (recorded in every row). Measured on Fashion-MNIST: >= 90% test accuracy at
28x28 and 16x16. Feature scale: the features are multiplied by a fixed factor, computed once from the trained weights
and recorded with them, that makes the mean of ||f||^2 / d over the first 5000 training images equal to 1. Without it
the features' inner products (x.y / d about 2.5) would put KID's cubic kernel (x.y / d + 1)^3 far from the regime it
was designed for (Inception: about 0.13). The factor is part of the feature space (and of the reference-statistics
cache key).

Architecture (suite's own choice, "cnn-v1"): three conv3x3-BN-ReLU stages of width 32, 64, 128, each followed by 2x2
max pooling (the last with ceil mode), flatten, Linear(.., 128), ReLU (the features), dropout 0.2, Linear(128,
classes). Training: AdamW (lr 3e-3, weight decay 5e-4), one-cycle schedule (20% warm-up), batch 128, random horizontal
flips, 4 epochs at >= 24 px, 8 epochs below (cheap, and the smaller images need them). Inputs scaled as the diffusion
models see them: x / 127.5 - 1.
"""

from __future__ import annotations

import contextlib
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

from bench import fileio
from bench.data.loading import dataset_info, eval_cache_dir, load_dataset
from bench.errors import ConfigError, DatasetError
from bench.fileio import atomic_write

PROXY_VERSION = "cnn-v1"
FEATURE_DIM = 128
HELD_OUT_MAX = 10_000  # the held-out part of a train split without a test split (module docstring)
SHORT_NAMES = {"fashion-mnist": "fmnist"}

# Committed extractors: (dataset, resolution, proxy seed) -> SHA-256 of
# WEIGHTS_DIR / "<proxy_name>-seed<seed>.pt". Pinned here, in code, rather than trusted from the
# .json next to the weights, so an edited or damaged weight file cannot pass as the shipped one.
WEIGHTS_DIR = Path(__file__).resolve().parent / "proxy_weights"
SHIPPED = {
    ("fashion-mnist", 12, 0): "fc8796d99774af9d94f03fea64d179c132cb52a4db1cd3a1bc90783a399f94a5",
    ("fashion-mnist", 16, 0): "d2089fcfc46a7924d1e9b6db726190f53776c7dedda03e82492a023179d8a42f",
    ("fashion-mnist", 28, 0): "c218088269c1fd3d2c0cf7daf305b69c30220f5865b4eeaaeca13456370fce83",
    ("synthetic", 16, 0): "5912f59b1d68e9594cabe92fdce49ff43d19ff2cdc594d65ebb3495a426a6b2e",
}
#: the feature scale recorded with each shipped extractor, pinned too: it multiplies every feature,
#: so an edited record would change every proxy number while the weights' hash still matched
SHIPPED_SCALES = {
    ("fashion-mnist", 12, 0): 0.5160318552560612,
    ("fashion-mnist", 16, 0): 0.4855660398257585,
    ("fashion-mnist", 28, 0): 0.3385618259909423,
    ("synthetic", 16, 0): 0.6696180957270759,
}


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
def accuracy(model: ProxyCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             indices: torch.Tensor | None = None) -> float:
    """Share of `images` (only those at `indices`, if given) classified right, on the model's device."""
    model.eval()
    correct, n, device = 0, len(images) if indices is None else len(indices), next(model.parameters()).device
    for lo in range(0, n, batch_size):
        rows = slice(lo, lo + batch_size) if indices is None else indices[lo:lo + batch_size]
        pred = model(_prep(images[rows].to(device))).argmax(1).cpu()
        correct += int((pred == labels[rows]).sum())
    return correct / n


def held_out_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) of a train split without a test split: a tenth held out, at most
    HELD_OUT_MAX, by permutation seed + 2 (the data order's is seed + 1); sorted (memory maps read in order)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    k = min(HELD_OUT_MAX, n // 10)
    return perm[k:].sort().values, perm[:k].sort().values


def train_proxy(train_images: torch.Tensor, train_labels: torch.Tensor, *, seed: int = 0, epochs: int | None = None,
                batch_size: int = 128, lr: float = 3e-3, verbose: bool = False, indices: torch.Tensor | None = None,
                device=None) -> ProxyCNN:
    """Train the proxy classifier deterministically; leaves the global RNG state untouched. Only on the
    rows `indices` if given; on `device` (default the CPU), where the model stays."""
    n, c, h, w = train_images.shape
    if h != w:
        raise ConfigError(f"the proxy classifier expects square images, got {h}x{w}")
    rows, device = None if indices is None else torch.as_tensor(indices), torch.device(device or "cpu")
    n = n if rows is None else len(rows)
    epochs = epochs or default_epochs(h)
    num_classes = int(train_labels.max()) + 1
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"need at least {batch_size} training images for the proxy, got {n}")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # manual_seed seeds CUDA too
        torch.manual_seed(seed)
        model = ProxyCNN(c, h, num_classes).to(device, memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
        g = torch.Generator().manual_seed(seed + 1)
        t0 = time.perf_counter()
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=g)
            perm = perm if rows is None else rows[perm]
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x = _prep(train_images[idx].to(device))  # (on the CPU, .to is the tensor itself)
                flip = (torch.rand(len(idx), generator=g) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                loss = F.cross_entropy(model(x), train_labels[idx].to(device))
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
    x, device = train_images[:SCALE_IMAGES], next(model.parameters()).device
    f = torch.cat([model.features(_prep(x[lo:lo + 1000].to(device))).double().cpu()
                   for lo in range(0, len(x), 1000)])
    ms = float((f * f).sum(1).mean() / f.shape[1])
    return 1.0 / math.sqrt(ms) if ms > 0 else 1.0


def _state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


class ProxyExtractor:
    """Penultimate-layer features of a proxy classifier for uint8 images [N, C, H, W].

    `shipped`: the weights are the committed, pinned ones (comparable across machines); else they
    were trained on this machine. `weights_sha256` (full hex) identifies the weights in result rows;
    `weights_sha1` is kept for older code and reference-statistics keys.
    """

    def __init__(self, model: ProxyCNN, info: dict, shipped: bool = False):
        self.model = model.eval()
        self.info = info
        self.scale = float(info["feature_scale"])
        self.preprocess = f"x / 127.5 - 1, no resize; features x {self.scale:.9g}"
        self.name = info["name"]
        self.weights_sha1 = info["weights_sha1"]
        self.weights_sha256 = info["weights_sha256"]
        self.shipped = bool(shipped)
        self.resolution = info["resolution"]
        self.in_ch = info["in_ch"]
        origin = "shipped" if self.shipped else "trained here"
        checked = "held-out" if info.get("accuracy_split", "test") != "test" else "test"
        self.source = (f"{self.name} ({origin}, {checked} accuracy {info['test_accuracy']:.4f}, "
                       f"sha256 {self.weights_sha256[:12]})")
        self.device = torch.device("cpu")

    def to(self, device) -> "ProxyExtractor":
        """Compute features on `device` (evaluation runs where the model trains)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.inference_mode()
    def features(self, images, batch_size: int = 1000) -> np.ndarray:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("proxy features need a uint8 tensor [N, C, H, W] (see bench.eval.sampling.to_uint8)")
        if images.shape[1] != self.in_ch or images.shape[2] != self.resolution or images.shape[3] != self.resolution:
            raise ValueError(f"{self.name} takes [N, {self.in_ch}, {self.resolution}, {self.resolution}] images, "
                             f"got {list(images.shape)}")
        out = [self.model.features(_prep(images[lo:lo + batch_size].to(self.device))).float().cpu().numpy()
               for lo in range(0, len(images), batch_size)]
        return np.concatenate(out) * np.float32(self.scale)


def proxy_paths(cache_dir, dataset: str, resolution: int, seed: int) -> tuple[Path, Path]:
    """Where an extractor trained on this machine is cached."""
    stem = f"{proxy_name(dataset, resolution)}-seed{seed}"
    folder = eval_cache_dir(cache_dir) / "proxy"
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def shipped_paths(dataset: str, resolution: int, seed: int) -> tuple[Path, Path]:
    """Where a shipped extractor lies (WEIGHTS_DIR is read at call time, so tests can move it)."""
    stem = f"{proxy_name(dataset, resolution)}-seed{seed}"
    return WEIGHTS_DIR / f"{stem}.pt", WEIGHTS_DIR / f"{stem}.json"


def _model_from_bytes(info: dict, data: bytes) -> ProxyCNN:
    # Building the module draws its (then overwritten) initial weights from the global RNG; forked
    # so that loading an extractor mid-training leaves the training's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        model = ProxyCNN(info["in_ch"], info["resolution"], info["num_classes"])
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return model.to(memory_format=torch.channels_last)


def load_shipped(dataset: str, resolution: int, seed: int = 0) -> ProxyExtractor:
    """The committed extractor for (dataset, resolution, seed), its bytes checked against SHIPPED.

    Reads only the two files (no dataset): the input size comes from the record. Any mismatch is
    a one-line ConfigError naming the file; retraining instead would silently give this machine a
    different feature space from everyone else's.
    """
    pinned = SHIPPED[(dataset, int(resolution), int(seed))]
    pt_path, json_path = shipped_paths(dataset, resolution, seed)
    fix = "restore it with `git checkout bench/eval/proxy_weights`"
    try:
        data = pt_path.read_bytes()
        info = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        bad = pt_path if not pt_path.is_file() else json_path
        raise ConfigError(f"shipped proxy extractor file {bad} is missing or unreadable "
                          f"({type(exc).__name__}); {fix}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != pinned:
        raise ConfigError(f"shipped proxy weights {pt_path} have SHA-256 {got[:12]}..., not the pinned "
                          f"{pinned[:12]}... (damaged or edited); {fix}")
    expected = {"name": proxy_name(dataset, resolution), "version": PROXY_VERSION, "dataset": dataset,
                "resolution": int(resolution), "seed": int(seed), "weights_sha256": pinned}
    expected["feature_scale"] = SHIPPED_SCALES[(dataset, int(resolution), int(seed))]
    wrong = [k for k, v in expected.items() if info.get(k) != v]
    if wrong:
        raise ConfigError(f"shipped proxy record {json_path} does not describe its weights "
                          f"(field {wrong[0]}); {fix}")
    try:
        model = _model_from_bytes(info, data)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"shipped proxy weights {pt_path} do not load ({type(exc).__name__}); {fix}") from None
    return ProxyExtractor(model, info, shipped=True)


_LOADED: dict = {}


def get_proxy(dataset: str, resolution: int | None = None, *, data_dir=None, cache_dir=None,
              seed: int = 0, retrain: bool = False, verbose: bool = False, device=None) -> ProxyExtractor:
    """The proxy extractor for (dataset, resolution, seed); resolution None: the dataset's own.

    In order: from memory; the shipped extractor when SHIPPED has one (checked against its pinned
    SHA-256; no dataset is loaded); from the cache (weights checked against the recorded hashes);
    else trained now, on `device` (default: CUDA when there is one, else the CPU), and cached, under a
    lock: of concurrent calls one trains, the others wait and load its files; it comes back on the CPU.
    `retrain=True` skips memory, shipped and cache and trains into the cache (for tests); it never writes
    to WEIGHTS_DIR. `data_dir` only says where to find the dataset when one must be trained.
    """
    res = int(resolution) if resolution else int(dataset_info(dataset).RESOLUTION)
    if not retrain and (dataset, res, seed) in SHIPPED:
        pt_path, _ = shipped_paths(dataset, res, seed)
        key = (str(pt_path.resolve()), seed)
        if key not in _LOADED:
            _LOADED[key] = load_shipped(dataset, res, seed)
            if verbose:
                print(f"proxy: {_LOADED[key].source}", file=sys.stderr)
        return _LOADED[key]

    pt_path, json_path = proxy_paths(cache_dir, dataset, res, seed)
    return cached_or_trained(dataset, res, seed, data_dir, pt_path, json_path, retrain=retrain, verbose=verbose,
                             device=device)


def cached_or_trained(dataset: str, res: int, seed: int, data_dir, pt_path: Path, json_path: Path, *, name=None,
                      retrain: bool = False, verbose: bool = False, device=None) -> ProxyExtractor:
    """The classifier cached at `pt_path` (memory, else disk, checked), else trained now under the lock and
    cached there, recorded under `name` (default proxy_name): get_proxy's rule, and REPA's teacher's."""
    if pt_path.resolve().is_relative_to(WEIGHTS_DIR.resolve()):
        raise ConfigError(f"the proxy cache {pt_path.parent} is inside {WEIGHTS_DIR}; shipped weights are "
                          "never overwritten, pick another cache_dir")
    key = (str(pt_path.resolve()), seed)
    if not retrain and key in _LOADED:
        return _LOADED[key]
    loader = _TrainSplit(dataset, data_dir, res)
    # Read without the lock first: a cache that is there needs no write access to its folder.
    ext = None if retrain else _load_cached(pt_path, json_path, loader, verbose)
    if ext is None:
        with training_lock(pt_path):
            ext = None if retrain else _load_cached(pt_path, json_path, loader, verbose)  # written while we waited?
            if ext is None:
                device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                ext = _train_and_cache(dataset, res, seed, data_dir, loader, (pt_path, json_path), verbose, device,
                                       name or proxy_name(dataset, res))
    _LOADED[key] = ext
    return ext


@contextlib.contextmanager
def training_lock(pt_path: Path):
    """Held while the extractor cached at `pt_path` is trained and written: the project's lock
    (bench.fileio.try_lock: flock, or an owner file where the file system refuses flock, as Lustre
    without -o flock) on <cache>/locks/proxy-<stem>.lock; it goes with its process, even a killed one."""
    lock = pt_path.parent.parent / "locks" / f"proxy-{pt_path.stem}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = fileio.try_lock(lock)
    if held is None:
        print(f"proxy: waiting for another process to train {pt_path.stem} ({lock})", file=sys.stderr)
        with fileio.locked(lock):
            yield
        return
    try:
        yield
    finally:
        held.close()


class _TrainSplit:
    """The training split, loaded on first use only (Fashion-MNIST takes seconds)."""

    def __init__(self, dataset: str, data_dir, res: int):
        self.args, self.data = (dataset, data_dir, res), None

    def __call__(self):
        if self.data is None:
            dataset, data_dir, res = self.args
            self.data = load_dataset(dataset, split="train", data_dir=data_dir, resolution=res)
        return self.data


def _load_cached(pt_path: Path, json_path: Path, train_split: _TrainSplit, verbose: bool):
    """A trained-here extractor from the cache, checked against its record; None if absent or unusable."""
    if not (pt_path.is_file() and json_path.is_file()):
        return None
    try:
        info = json.loads(json_path.read_text())
        data = pt_path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        if (hashlib.sha1(data).hexdigest() == info["weights_sha1"] and info.get("version") == PROXY_VERSION
                and info.get("weights_sha256", sha256) == sha256):
            model = _model_from_bytes(info, data)
            if "feature_scale" not in info or "weights_sha256" not in info:  # a record from an older version
                if "feature_scale" not in info:
                    info["feature_scale"] = feature_scale(model, train_split()[0])
                info["weights_sha256"] = sha256
                atomic_write(json_path, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
            return ProxyExtractor(model, info)
        if verbose:
            print(f"proxy: cached {pt_path.name} does not match its record; retraining", file=sys.stderr)
    except (OSError, ValueError, KeyError, RuntimeError):
        pass
    return None


def _train_and_cache(dataset: str, res: int, seed: int, data_dir, train_split: _TrainSplit, paths: tuple[Path, Path],
                     verbose: bool, device: torch.device, name: str) -> ProxyExtractor:
    """Train the extractor here (deterministic code, machine-dependent floats) and cache it with its record."""
    pt_path, json_path = paths
    train_x, train_y = train_split()
    try:
        test, rows, held = load_dataset(dataset, split="test", data_dir=data_dir, resolution=res), None, None
    except DatasetError:  # the train split loaded, so it is the test split that is missing: hold out part of train
        test, (rows, held) = None, held_out_split(len(train_x), seed)
        if verbose:
            print(f"proxy: {dataset} has no test split; {len(held)} training images held out", file=sys.stderr)
    t0 = time.perf_counter()
    model = train_proxy(train_x, train_y, seed=seed, verbose=verbose, indices=rows, device=device)
    train_seconds = time.perf_counter() - t0
    acc = accuracy(model, *test) if held is None else accuracy(model, train_x, train_y, indices=held)
    scale = feature_scale(model, train_x)
    model = model.cpu()  # cached and returned on the CPU, like a shipped one
    data = _state_bytes(model)
    checked = {"accuracy_split": "test"} if held is None else {
        "accuracy_split": "train, held out (no test split)", "held_out_images": len(held)}
    info = {"name": name, "version": PROXY_VERSION, "dataset": dataset, "resolution": res,
            "in_ch": int(train_x.shape[1]), "num_classes": int(train_y.max()) + 1, "seed": seed,
            "epochs": default_epochs(res), "train_images": len(train_x) if rows is None else len(rows),
            "test_accuracy": acc, **checked, "train_seconds": round(train_seconds, 2), "device": device.type,
            "threads": torch.get_num_threads(), "feature_scale": scale, "torch": torch.__version__,
            "weights_sha1": hashlib.sha1(data).hexdigest(), "weights_sha256": hashlib.sha256(data).hexdigest()}
    if dataset == "fashion-mnist" and acc < 0.9:
        warnings.warn(f"proxy classifier for {dataset} at {res}px reached only {acc:.3f} test accuracy (< 0.90)")
    atomic_write(pt_path, lambda f: f.write(data))
    atomic_write(json_path, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    if verbose:
        print(f"proxy: trained {info['name']} on {device.type} in {train_seconds:.0f}s, "
              f"{checked['accuracy_split']} accuracy {acc:.4f}", file=sys.stderr)
    return ProxyExtractor(model, info)
