"""The evaluation spec: every key an evaluation takes, its default, and its checks (torch-free:
a suite's [eval] table is checked against it before anything runs; bench/eval/evaluate.py runs it).

Spec keys (all optional; unknown keys are an error):

====================  =================  =====================================================
key                   default            meaning
====================  =================  =====================================================
dataset               "fashion-mnist"    reference data (bench/data/loading.py name)
data_dir              None               where the dataset lies (bench/data/loading.py)
resolution            None               image size (None: the dataset's own)
metrics               proxy_fd,          any of "proxy_fd", "proxy_kid" (bench/eval/proxy.py: fast,
                      proxy_kid          CPU default) and "fid", "kid" (bench/eval/fid.py, Inception)
num_images            1000               generated images per evaluation (num_gen)
num_ref               None               reference images (None: as many as num_images; "all": the
                                         whole split, e.g. a prepared training set); a
                                         fixed random subset (seed 0) of the split
ref_split             "train"            "train" or "test"
sampler               "ddim"             "ddim" or "ddpm" (ancestral)
sampler_steps         25                 None: 50 for ddim, T for ddpm
eta                   0.0                DDIM's eta (0 deterministic, 1 ancestral-like)
batch_size            250                sampling batch (the samples do not depend on it); on a GPU at
                                         most this, fewer where an activation estimate says it does
                                         not fit in free memory, halved on running out of memory
sample_precision      None               the network's precision while sampling: "fp32", "tf32" or
                                         "bf16" (autocast); None: TF32 on a CUDA GPU (DiT's sampler),
                                         fp32 on a CPU (where TF32 does not exist); every row names
                                         the one used. Features are always computed in plain fp32
noise_seed            0                  image i always gets the noise of (noise_seed, i)
cache_dir             None               proxy weights and reference statistics (None: $DIFFBENCH_CACHE/eval,
                                         by default ~/.cache/diffbench/eval, shared by every results folder)
clip_x0               True               clamp x0_hat to [-1, 1] at every sampling step
timestep_spacing      "linspace"         which timesteps a short sampler visits: "linspace" (T-1 .. 0,
                                         both ends), "leading" (ends at 0), "trailing" (starts at
                                         T-1 but with few steps never visits small t: 10 steps stop at 99)
                                         or "quadratic" (DDIM's quadratic spacing, T-1 .. 0, dense near t = 0)
ddpm_variance         "large"            ddpm sigma^2: "large" = beta (DDPM paper), "small" =
                                         posterior variance (then ddpm equals ddim with eta 1)
inception             None               Inception weights path (else the lookup in bench/eval/inception.py)
device                None               feature device (None: the model's device)
proxy_seed            0                  seed of the proxy classifier's training
kid_subsets           100                KID: number of subsets
kid_subset_size       1000               KID: largest subset size
num_classes           0                  a class-conditional model's K (set by training): image i
                                         gets label i mod K, with the same noise as unconditional
guidance_scale        1.0                classifier-free guidance: out = u + s (c - u) (1: the
                                         conditional output alone, one forward per step); != 1
                                         needs class_cond = true (checked with the run's config)
fid_mode              "clean"            clean-fid's mode for fid/kid: "clean" or "legacy_tensorflow"
                                         (TensorFlow's resize, as published CIFAR10/ImageNet FIDs;
                                         needs clean-fid's own inception-2015-12-05.pt)
ref_stats             None               an .npz with mu and sigma (guided-diffusion's reference batches,
                                         e.g. VIRTUAL_imagenet128_labeled.npz) as FID's reference
                                         instead of statistics of the dataset (no KID, no noise floor)
final_num_images      None               also evaluate the end of the budget with this many images,
                                         as metrics "<metric>_final" (e.g. FID-50k beside the FID-10k
                                         curve; the curve's own points keep one N, as speed-ups need)
noise_sets            1                  at the evaluation at the workload's budget, and at every
                                         evaluation of an extended baseline (the headline reads its
                                         curve), the metric is the mean over this many noise sets of
                                         num_images images each (noise_seed, noise_seed + 1, ...); the
                                         rows keep every set's value (set_values) and their sd (value_sd),
                                         the report's measure of the metric's own noise
sampler2              None               a second sampler for the evaluation at the budget, e.g.
                                         {sampler = "ddim", sampler_steps = 50, timestep_spacing =
                                         "linspace"} (keys: sampler, sampler_steps, timestep_spacing,
                                         eta), as metrics "<metric>_sampler2": the report shows the
                                         final differences under both samplers and flags sign changes
save_samples          False              write each evaluation's samples to the run folder as
                                         samples/step<k>.npz (arr_0: uint8 NHWC, arr_1: labels of a
                                         class-conditional run; guided-diffusion's sample format);
                                         final_num_images' set as samples/step<k>_final.npz
verbose               False              print what is loaded or computed to stderr
====================  =================  =====================================================
"""

from __future__ import annotations

from bench.errors import ConfigError

METRICS = ("proxy_fd", "proxy_kid", "fid", "kid")
DEFAULTS = {
    "dataset": "fashion-mnist",
    "data_dir": None,
    "resolution": None,
    "metrics": ["proxy_fd", "proxy_kid"],
    "num_images": 1000,
    "num_ref": None,
    "ref_split": "train",
    "sampler": "ddim",
    "sampler_steps": 25,
    "eta": 0.0,
    "batch_size": 250,
    "sample_precision": None,
    "noise_seed": 0,
    "cache_dir": None,
    "clip_x0": True,
    "timestep_spacing": "linspace",
    "ddpm_variance": "large",
    "inception": None,
    "device": None,
    "proxy_seed": 0,
    "kid_subsets": 100,
    "kid_subset_size": 1000,
    "num_classes": 0,
    "guidance_scale": 1.0,
    "fid_mode": "clean",
    "ref_stats": None,
    "save_samples": False,
    "final_num_images": None,
    "noise_sets": 1,
    "sampler2": None,
    "verbose": False,
}


def resolve_spec(spec: dict | None, T: int | None = None) -> dict:
    """Defaults filled in and every value checked; raises ConfigError with one line. With the
    chain length T the sampler's steps are checked against it too (else against a generous bound)."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"eval: unknown key {unknown[0]!r}; known keys: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **{k: v for k, v in spec.items() if v is not None or k in ("resolution", "data_dir")}}
    metrics = out["metrics"]
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ConfigError(f"eval: unknown metric {bad[0] if bad else '(none given)'!r}; use any of {', '.join(METRICS)}")
    out["metrics"] = metrics
    if out["cache_dir"] is None:
        # torch on first use: suite files are checked (bench.suite.schema) without torch
        from bench.data.loading import eval_cache_dir

        out["cache_dir"] = str(eval_cache_dir())
    for key in ("num_images", "batch_size", "kid_subsets", "kid_subset_size"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 2:
            raise ConfigError(f"eval: {key} must be an integer >= 2, got {out[key]!r}")
    if out["num_ref"] not in (None, "all") and (not isinstance(out["num_ref"], int) or out["num_ref"] < 2):
        raise ConfigError(f"eval: num_ref must be an integer >= 2, \"all\" or null, got {out['num_ref']!r}")
    if not isinstance(out["num_classes"], int) or isinstance(out["num_classes"], bool) or out["num_classes"] < 0:
        raise ConfigError(f"eval: num_classes must be an integer >= 0, got {out['num_classes']!r}")
    if not isinstance(out["guidance_scale"], (int, float)) or isinstance(out["guidance_scale"], bool) \
            or not 0 <= out["guidance_scale"] < float("inf"):
        raise ConfigError(f"eval: guidance_scale must be a finite number >= 0, got {out['guidance_scale']!r}")
    if out["final_num_images"] is not None and (not isinstance(out["final_num_images"], int)
                                                or isinstance(out["final_num_images"], bool)
                                                or out["final_num_images"] < 2):
        raise ConfigError(f"eval: final_num_images must be an integer >= 2 or null, got {out['final_num_images']!r}")
    if not isinstance(out["noise_sets"], int) or isinstance(out["noise_sets"], bool) or out["noise_sets"] < 1:
        raise ConfigError(f"eval: noise_sets must be an integer >= 1, got {out['noise_sets']!r}")
    if out["sampler2"] is not None:
        out["sampler2"] = _check_sampler2(out["sampler2"], T)
    if out["fid_mode"] not in ("clean", "legacy_tensorflow"):
        raise ConfigError(f"eval: fid_mode must be clean or legacy_tensorflow, got {out['fid_mode']!r}")
    if out["ref_stats"] is not None:
        from pathlib import Path

        if not Path(str(out["ref_stats"])).is_file():
            raise ConfigError(f"eval: ref_stats {out['ref_stats']!r} is not a file; give the path of an .npz with mu "
                              "and sigma (e.g. guided-diffusion's VIRTUAL_imagenet128_labeled.npz)")
        if "kid" in metrics:
            raise ConfigError("eval: kid needs the reference's features, and ref_stats holds only mu and sigma; "
                              "drop kid or ref_stats")
        check_ref_stats(str(out["ref_stats"]))
    if out["sample_precision"] not in (None, "fp32", "tf32", "bf16"):
        raise ConfigError(f"eval: sample_precision must be fp32, tf32, bf16 or null (the device's default), "
                          f"got {out['sample_precision']!r}")
    if out["ref_split"] not in ("train", "test"):
        raise ConfigError(f"eval: ref_split must be train or test, got {out['ref_split']!r}")
    # torch on first use: suite files are checked (bench.suite.schema) without torch
    from bench.eval.sampling import SAMPLERS, check_sampler_args

    if out["sampler"] not in SAMPLERS:
        raise ConfigError(f"eval: unknown sampler {out['sampler']!r}; use one of {', '.join(SAMPLERS)}")
    if "sampler_steps" in spec and spec["sampler_steps"] is None:
        out["sampler_steps"] = None
    try:
        check_sampler_args(out["sampler"], out["sampler_steps"], out["eta"], T or 10**9, out["ddpm_variance"],
                           out["timestep_spacing"])
    except ConfigError as exc:
        raise ConfigError(f"eval: {exc}" + (f" (T = {T})" if T else "")) from None
    return out


SAMPLER2_KEYS = ("sampler", "sampler_steps", "timestep_spacing", "eta")


def _check_sampler2(value, T: int | None) -> dict:
    """sampler2: a table of sampler settings, each checked as the main sampler's are."""
    # torch on first use: suite files are checked (bench.suite.schema) without torch
    from bench.eval.sampling import SAMPLERS, check_sampler_args

    if not isinstance(value, dict) or not value:
        raise ConfigError(f"eval: sampler2 must be a table such as {{sampler = \"ddim\", sampler_steps = 50}}, "
                          f"got {value!r}")
    unknown = sorted(set(value) - set(SAMPLER2_KEYS))
    if unknown:
        raise ConfigError(f"eval: sampler2 has unknown key {unknown[0]!r}; its keys: {', '.join(SAMPLER2_KEYS)}")
    out = {"sampler": "ddim", "sampler_steps": 50, "timestep_spacing": "linspace", "eta": 0.0, **value}
    if out["sampler"] not in SAMPLERS:
        raise ConfigError(f"eval: sampler2: unknown sampler {out['sampler']!r}; use one of {', '.join(SAMPLERS)}")
    try:
        check_sampler_args(out["sampler"], out["sampler_steps"], out["eta"], T or 10**9, DEFAULTS["ddpm_variance"],
                           out["timestep_spacing"])
    except ConfigError as exc:
        raise ConfigError(f"eval: sampler2: {exc}") from None
    return out


def check_ref_stats(path: str) -> None:
    """mu (2048,) and sigma (2048, 2048) in the .npz, read from the arrays' headers only (a suite
    check must not load 32 MB per run); bench.eval.fid.external_stats loads them after this check."""
    import zipfile
    import zlib

    import numpy as np

    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                key = name.removesuffix(".npy")  # np.load's names, as external_stats reads them
                if key in ("mu", "sigma"):
                    with zf.open(name) as f:
                        version = np.lib.format.read_magic(f)
                        read = np.lib.format.read_array_header_1_0 if version[0] == 1 else \
                            np.lib.format.read_array_header_2_0
                        shapes[key] = read(f)[0]
    except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error):
        pass
    if set(shapes) != {"mu", "sigma"}:
        raise ConfigError(f"eval: ref_stats {path}: not an .npz with mu and sigma; give guided-diffusion's reference "
                          "batch or an .npz written with np.savez(mu=..., sigma=...)")
    if shapes["mu"] != (2048,) or shapes["sigma"] != (2048, 2048):
        raise ConfigError(f"eval: ref_stats {path}: mu {shapes['mu']} and sigma {shapes['sigma']} are not Inception "
                          "pool features (2048 and 2048 x 2048)")
