"""FID and KID through clean-fid's Inception features (bench/eval/inception.py), with cached statistics.

Features are clean-fid's "clean" mode (Parmar et al. 2022): each uint8 image, grey images
replicated to RGB as PIL's convert("RGB") does, is resized to 299x299 per channel by clean-fid's
own resizer (PIL bicubic on float32, clipped to [0, 255]) and passed to the TensorFlow
Inception-v3 (2015-12-05) port as ``layers((x - 128) / 128)``; the 2048-d pool features follow.
Generated images are handed over in memory as uint8 (:func:`bench.eval.sampling.to_uint8`, the same
bytes a PNG of them holds), so no PNG round trip is needed and the number equals clean-fid's
``compute_fid(folder_a, folder_b, mode="clean")`` on the PNGs (tests/test_fid.py checks < 1e-3).

Speed-ups that leave the meaning unchanged (measured by ``python -m bench.tools.speed_eval``; the
docs/architecture.md's "Speed" section has its output): channels_last input to the network, Inception in
micro-batches on a CPU and whole batches on a GPU, the resize overlapped with the network
(bench/eval/inception.py), reference images split among GPUs (:func:`feature_shards`), inference mode, the Fréchet trace through symmetric eigenvalues instead of
scipy's sqrtm (same value to ~1e-5), KID kernels computed once and indexed per subset, reference
statistics computed once and cached, no PNG round trip. No reduced precision.

Reference statistics (mean, covariance and the features, for KID) are computed once per
(dataset, split, resolution, number of images, subset seed, feature extractor, weights SHA-1,
preprocessing) and cached as .npz under the cache folder; the whole key is stored in the file
and checked on load, so changing any part never reuses stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.core.runtime import full_fp32, resolve_device
from bench.data.loading import eval_cache_dir, load_dataset
from bench.errors import ConfigError
from bench.eval.inception import get_inception
from bench.eval.spec import check_ref_stats
from bench.fileio import atomic_write

STATS_FORMAT = 1


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (as numpy.cov) in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)

def moments(feats: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """One shard's (n, mean, sum over its images of (f - mean)(f - mean)^T), all in float64."""
    f = np.asarray(feats, dtype=np.float64)
    mean = f.mean(axis=0)
    centred = f - mean
    return len(f), mean, centred.T @ centred


def merge_moments(parts: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of the union of shards from their moments (Chan, Golub and LeVeque
    1979): the scatter about the common mean is each shard's plus n_k (m_k - m)(m_k - m)^T. Equal to
    feature_stats of the concatenation up to float64 round-off (no large sums cancel)."""
    n = sum(p[0] for p in parts)
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors, got {n}")
    mean = sum(k * m for k, m, _ in parts) / n
    scatter = sum(m2 + k * np.outer(m - mean, m - mean) for k, m, m2 in parts if k)
    return mean, scatter / (n - 1)


def feature_shards(extractors: list, images) -> list[np.ndarray]:
    """Features of `images` split in len(extractors) contiguous shards, shard k by extractor k (one per
    GPU), all at once in threads (the network and PIL release the GIL); in image order."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.core.runtime import shard_range

    ranges = [shard_range(len(images), k, len(extractors)) for k in range(len(extractors))]
    if len(extractors) == 1:
        return [extractors[0].features(images)]
    with ThreadPoolExecutor(len(extractors)) as pool:
        return list(pool.map(lambda er: er[0].features(images[er[1].start:er[1].stop]), zip(extractors, ranges)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}).

    Tr((S1 S2)^{1/2}) is the sum of the square roots of the eigenvalues of S1^{1/2} S2 S1^{1/2}
    (similar to S1 S2, symmetric positive semi-definite): two symmetric eigen-decompositions
    instead of scipy.linalg.sqrtm. Round-off negatives (eigenvalues and the distance) are clipped to 0.
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
    # A distance is >= 0: round-off takes identical sets to about -1e-5, reported as 0.
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean))

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

@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray
    num: int
    key: dict
    path: Path | None
    computed: bool  # False when read from the cache

    def features(self) -> np.ndarray:
        """The reference's features (KID needs them), read from the cache file on first use: a cached
        reference is loaded without them (1.28M ImageNet features are 10 GB per process; their shape
        was checked then, their bytes are checked now, by the zip's CRC-32)."""
        if self.feats is None and self.path is not None:
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    self.feats = z["feats"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                raise ConfigError(f"reference statistics {self.path}: their features do not load ({type(exc).__name__}: "
                                  "the file is damaged); delete it and run again: it is recomputed") from None
        return self.feats

    @property
    def sha256(self) -> str:
        """The statistics' own hash (of mu and sigma as float64): the same reference whatever file or
        machine it was read from; every evaluation row records it (`ref_sha256`)."""
        if "_sha256" not in self.__dict__:
            self.__dict__["_sha256"] = stats_sha256(self.mu, self.sigma)[:16]
        return self.__dict__["_sha256"]


def stats_sha256(mu: np.ndarray, sigma: np.ndarray) -> str:
    """The SHA-256 of a reference's mean and covariance as float64 (a cache file records it)."""
    h = hashlib.sha256(np.ascontiguousarray(mu, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(sigma, dtype=np.float64).tobytes())
    return h.hexdigest()


def select_subset(n_total: int, num: int | None, seed: int = 0) -> torch.Tensor | None:
    """Indices of a fixed random subset of `num` of `n_total` items (None: all of them)."""
    if num is None or num >= n_total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_total, generator=g)[:num]).values

def stats_key(extractor, dataset: str, split: str, resolution: int, num: int, subset_seed: int,
              data_dir=None) -> dict:
    key = {"format": STATS_FORMAT, "dataset": dataset, "split": split, "resolution": int(resolution),
           "num": int(num), "subset_seed": int(subset_seed), "extractor": extractor.name,
           "weights_sha1": extractor.weights_sha1, "preprocess": extractor.preprocess}
    if data_dir is not None:  # two folders of one dataset name (prepared sets) are two references
        key["data_dir"] = str(Path(data_dir).resolve())
    return key

def external_stats(path) -> RefStats:
    """FID reference statistics from an .npz with `mu` and `sigma` (guided-diffusion's reference
    batches, e.g. VIRTUAL_imagenet128_labeled.npz, hold them beside the images); no features."""
    check_ref_stats(str(path))  # names and shapes, each wrong one a single line
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
            num = len(z["arr_0"]) if "arr_0" in z.files else 0
    except (OSError, ValueError, KeyError, EOFError) as exc:  # the headers read, the data does not
        raise ConfigError(f"ref_stats {path}: its arrays do not load ({type(exc).__name__}); the file is damaged") \
            from None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return RefStats(mu, sigma, None, num, {"ref_stats": str(path), "sha256": digest}, Path(path), computed=False)


def stats_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = (f"{key['dataset']}-{key['split']}-r{key['resolution']}-n{key['num']}-{key['extractor']}-"
            f"{key['weights_sha1'][:10]}-{digest}.npz")
    return eval_cache_dir(cache_dir) / "fid_stats" / name.replace("/", "_").replace(":", "_")

def reference_stats(extractor, dataset: str, split: str = "train", *, num: int | None = None,
                    resolution: int | None = None, data_dir=None, cache_dir=None,
                    subset_seed: int = 0, images=None, verbose: bool = False,
                    compute_limit: int | None = None, shards: list | None = None) -> RefStats:
    """Statistics of `num` images (None: all) of a dataset split in `extractor`'s feature space,
    read from the cache when an entry with exactly this key exists, else computed and cached.

    `images` (uint8 [N, C, H, W]) can be passed to skip loading the dataset (they must be that
    split at that resolution); the subset is then drawn from them. `compute_limit`: statistics of
    more images than this that are not cached are an error naming ``run_bench.py ref-stats`` (a
    training job computes small references only). `shards`: extractors of the same network on
    several devices (every GPU), each given a contiguous share of the images; the shares' moments
    are merged (:func:`merge_moments`), the same statistics to float64 round-off, under the same key.
    """
    if images is None:
        images, _ = load_dataset(dataset, split=split, data_dir=data_dir, resolution=resolution)
    n_total = len(images)
    res = int(images.shape[-1])
    idx = select_subset(n_total, num, subset_seed)
    n = n_total if idx is None else len(idx)
    key = stats_key(extractor, dataset, split, res, n, subset_seed, data_dir)
    path = stats_path(cache_dir, key)
    damage = None
    if path.is_file():
        cached, damage = read_cached_stats(path, key)
        if cached is not None:
            return cached
    if compute_limit is not None and n > compute_limit:
        raise ConfigError(
            f"reference statistics of {n:,} {dataset} {split} images ({extractor.name}) are "
            f"{'not cached' if damage is None else f'damaged in the cache ({damage})'}, and a training "
            f"job computes at most {compute_limit:,}: run `python run_bench.py ref-stats SUITE` (or ref-stats "
            f"{dataset} ...) once, where the runs will read them ({path.parent})")
    if damage is not None:
        print(f"note: reference statistics {path} are damaged ({damage}); recomputing them", file=sys.stderr)
    t0 = time.perf_counter()
    subset = images if idx is None else images[idx]
    parts = feature_shards(shards or [extractor], subset)
    feats = np.concatenate(parts)
    # One shard: numpy.cov as before (the committed numbers); several: their moments merged.
    mu, sigma = feature_stats(feats) if len(parts) == 1 else merge_moments([moments(p) for p in parts if len(p)])
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, feats=feats.astype(np.float32),
                                           key=np.array(json.dumps(key, sort_keys=True)),
                                           sha256=np.array(stats_sha256(mu, sigma))))
    if verbose:
        print(f"reference statistics {path.name}: {n} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return RefStats(mu, sigma, feats, n, key, path, computed=True)

def read_cached_stats(path: Path, key: dict) -> tuple[RefStats | None, str | None]:
    """A cache file's statistics (features read lazily), or None and what is wrong with it: cut or
    unreadable, another key's, arrays of the wrong shape or not finite, or not the SHA-256 it records
    (files from before it was recorded have none). Reads mu and sigma, and the features' header only."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"key", "mu", "sigma", "feats"} <= set(z.files):
                return None, f"it lacks {sorted({'key', 'mu', 'sigma', 'feats'} - set(z.files))}"
            if json.loads(str(z["key"])) != key:
                return None, "it holds another reference's statistics"
            mu, sigma = z["mu"], z["sigma"]
            with z.zip.open("feats.npy") as f:  # the shape alone: the features are read when KID needs them
                fmt = np.lib.format
                header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                feats_shape = header(f)[0]
            recorded = str(z["sha256"]) if "sha256" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return None, f"unreadable: {type(exc).__name__}"
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or feats_shape != (key["num"], d):
        return None, f"shapes mu {mu.shape}, sigma {sigma.shape}, features {feats_shape} for {key['num']} images"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return None, "non-finite statistics"
    if recorded is not None and recorded != stats_sha256(mu, sigma):
        return None, "its statistics do not match the SHA-256 it records"
    return RefStats(mu, sigma, None, key["num"], key, path, computed=False), None


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
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as im:
                return np.array(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ConfigError(f"{self.files[i]} is not a readable image ({type(exc).__name__}); remove it from the "
                              "folder or replace it") from None

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
        return st.features()
    raise ConfigError(f"{spec!r} is neither a folder nor a dataset statistic written dataset:split (e.g. fashion-mnist:train)")

def cli_fid(path_a: str, path_b: str, **opts) -> float:
    """FID between two image folders, or a folder and a dataset statistic ("fashion-mnist:train").

    Options: inception or weights (weights path), device ("auto": CUDA when there is a GPU), batch_size (50), num (use only the
    first `num` files of a folder / a fixed random `num` of a dataset split; default all),
    resolution and data_dir (for a dataset side), cache_dir, threads, verbose.
    """
    unknown = set(opts) - {"inception", "weights", "device", "batch_size", "num", "resolution", "data_dir",
                           "cache_dir", "threads", "verbose"}
    if unknown:
        raise ConfigError(f"cli_fid: unknown option {sorted(unknown)[0]!r}")
    opts = {k: v for k, v in opts.items() if v is not None}
    if "num" in opts and (isinstance(opts["num"], bool) or not isinstance(opts["num"], int) or opts["num"] < 2):
        raise ConfigError(f"--num must be an integer >= 2 (FID needs a covariance of the features), got {opts['num']!r}")
    for side in (path_a, path_b):  # fail before loading Inception
        if Path(side).is_dir():
            found = len(list_images(side))
            if found < 2:
                raise ConfigError(f"no images found under {side}" if not found else
                                  f"{side} holds 1 image; FID needs at least 2 (a covariance of the features)")
        elif ":" not in side:
            raise ConfigError(f"{side!r} is neither a folder nor a dataset statistic written dataset:split "
                              "(e.g. fashion-mnist:train)")
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))

    device = resolve_device(opts.get("device") or "auto")
    ext = get_inception(opts.get("inception") or opts.get("weights"), device,
                        verbose=opts.get("verbose", False))
    if opts.get("batch_size"):
        ext.batch_size = int(opts["batch_size"])

    with full_fp32():  # no TF32 on a GPU: the features as fp32 computes them
        fa = _side_features(ext, path_a, opts)
        fb = _side_features(ext, path_b, opts)
    return fid_from_feats(fa, fb)
