"""The evaluation hook: sample from a model with fixed noise and score the samples.

``Evaluator(spec).evaluate(model, schedule, target, step) -> list[dict]`` is called by
bench/train/loop.py on the EMA model every ``eval_every`` iterations and at the end; the caller
appends the rows to the run's evals.jsonl.

Its spec (keys, defaults, checks) is bench/eval/spec.py's.

The defaults are the fastest sensible setting on a CPU: deterministic DDIM and the proxy
metrics; Inception FID costs far more per image (measured by ``python -m bench.tools.speed_eval``; the
docs/architecture.md's "Speed" section has its output).

Each row is flat: step, metric, value, feature_extractor, num_gen, ref_split, num_ref, ref_sha256
(the reference statistics' hash: bench.eval.fid.RefStats.sha256), sampler, sampler_steps,
sample_precision (the network's precision while sampling), eta (None for ddpm), eval_seconds;
and also dataset, resolution, noise_seed, weights_sha1 and weights_sha256 (of the feature extractor), weights_shipped (a
pinned extractor from the repository, not one trained on this machine), timestep_spacing and
timesteps (the sampler's visited timesteps, in order), noise_floor (the same metric between
num_gen real images, disjoint from the reference set, and the reference: what a perfect
generator would score at this N) with noise_floor_source (where there are not N such images, as
for FID-50k against all of CIFAR-10's train split, noise_floor is None and the source says why,
cached as such), sample_seconds and setup_seconds; sample_batch_size and sample_batch_halvings
only where the sampling batch was not the spec's (sized to a GPU's free memory, or halved when it
ran out: bench.eval.sampling.sampling_batch; the images do not depend on it).
eval_seconds is the wall time of the whole evaluate() call, the same on every row of that
call (do not add it up over rows); setup_seconds is the part spent once per process (loading
Inception, training or loading the proxy, reference statistics), non-zero on the first call.
KID values are raw (not multiplied by 1000).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from bench.core.runtime import full_fp32, gather_objects, is_main, sample_precision, sampling_in, shard
from bench.data.loading import load_dataset
from bench.errors import ConfigError, DatasetError
from bench.eval.fid import (
    external_stats,
    feature_stats,
    frechet_distance,
    kernel_distance,
    reference_stats,
    select_subset,
)
from bench.eval.inception import get_inception
from bench.eval.proxy import get_proxy
from bench.eval.sampling import (
    check_sampler_args,
    model_device,
    sample,
    sampling_batch,
    timestep_sequence,
    to_uint8,
)
from bench.eval.spec import resolve_spec
from bench.fileio import atomic_write_bytes


def check_eval_data(spec: dict, cache: bool = True) -> None:
    """The splits an evaluation reads exist: its reference split, and the test split the proxy
    classifier is checked on. One error line before a run folder is written, not at the first
    evaluation after hours of training. cache=False: nothing stays in memory (a process that
    does not evaluate)."""
    load = load_dataset if cache else load_dataset.__wrapped__
    s = resolve_spec(spec)
    where = s["dataset"] + (f" ({s['data_dir']})" if s["data_dir"] else "")
    needs = [(s["ref_split"], f'ref_split = "{s["ref_split"]}"', 'set ref_split = "train"')]
    if {"proxy_fd", "proxy_kid"} & set(s["metrics"]) and s["ref_split"] != "test":
        needs.append(("test", "proxy metrics check their classifier on the test split",
                      'evaluate it with metrics = ["fid"]'))
    for split, why, fix in needs:
        try:
            load(s["dataset"], split=split, data_dir=s["data_dir"], resolution=s["resolution"])
        except DatasetError as exc:
            if split == "train":
                raise  # the data itself is missing or unusable: its own message says what to do
            try:  # is it this split that is missing, or the whole dataset?
                load(s["dataset"], split="train", data_dir=s["data_dir"], resolution=s["resolution"])
            except DatasetError:
                raise exc from None
            raise ConfigError(f"eval: {why}, and {where} has no {split} split; {fix}") from None


def read_cached_floor(path, ref_sha256: str) -> tuple[dict | None, str | None]:
    """A cached noise floor, or None and what is wrong with it: unreadable, keys or values that are
    not a floor's (source; fd and kid both finite numbers, or both None: not computable), or computed
    against other reference statistics than `ref_sha256` (floors from before that was recorded: not
    checked)."""
    try:
        floor = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {type(exc).__name__}"
    if not isinstance(floor, dict) or not {"source", "fd", "kid"} <= set(floor):
        return None, "it lacks " + ("source, fd and kid" if not isinstance(floor, dict) else
                                    ", ".join(sorted({"source", "fd", "kid"} - set(floor))))
    values = [floor["fd"], floor["kid"]]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)
    if not isinstance(floor["source"], str) or not (numbers or values == [None, None]):
        return None, f"fd {floor['fd']!r}, kid {floor['kid']!r} and source {str(floor['source'])[:40]!r} are not a floor's"
    if floor.get("ref_sha256", ref_sha256) != ref_sha256:
        return None, "it was computed against other reference statistics"
    return floor, None


class Evaluator:
    """Samples ``num_images`` images with fixed noise and computes the configured metrics."""

    def __init__(self, spec: dict | None = None, compute_limit: int | None = None):
        """`compute_limit`: reference statistics and noise floors of more images than this that are not
        cached are an error (a training job's limit: bench.eval.reference.TRAIN_COMPUTE_LIMIT)."""
        self.spec = resolve_spec(spec)
        self.compute_limit = compute_limit
        self._prepared: dict = {}
        self._variants: dict = {}
        self._batch: int | None = None  # the sampling batch (bench.eval.sampling.sampling_batch), halved on OOM
        self._halvings: list = []

    def variant(self, **change) -> "Evaluator":
        """This evaluation with some spec keys changed (another sampler, another N), made once per
        change (a variant prepared when training starts is the one the budget's evaluation uses); it
        shares this one's feature extractors and reference statistics when N and the metrics are unchanged."""
        key = repr(sorted(change.items()))
        if key not in self._variants:
            other = Evaluator({**self.spec, **change}, self.compute_limit)
            if other.spec["num_images"] == self.spec["num_images"] and other.spec["metrics"] == self.spec["metrics"]:
                other._prepared = self._prepared
            self._variants[key] = other
        return self._variants[key]

    @property
    def prepared_families(self) -> dict:
        """What prepare() loaded per feature family ("proxy", "inception"): (extractor, reference, floor)."""
        return {k: v for k, v in self._prepared.items() if k in ("proxy", "inception")}

    @property
    def resolution(self) -> int | None:
        """The evaluated images' resolution (known once prepared)."""
        return int(self._prepared["shape"][-1]) if "shape" in self._prepared else None

    @property
    def is_prepared(self) -> bool:
        """Whether prepare() has run (here, or in the evaluation whose setup this variant shares)."""
        return "shape" in self._prepared

    # -- one-time setup ------------------------------------------------------------------------
    def _ref_images(self) -> torch.Tensor:
        s = self.spec
        images, _ = load_dataset(s["dataset"], split=s["ref_split"], data_dir=s["data_dir"], resolution=s["resolution"])
        return images

    def prepare(self, device=None, shard_devices: list | None = None) -> float:
        """Load feature extractors and reference statistics (cached on disk and in this object).
        Returns the seconds spent; evaluate() calls it, so calling it first is optional.
        `shard_devices`: Inception reference statistics not cached are computed with the images
        split among these devices (ref-stats on every GPU of a node)."""
        t0 = time.perf_counter()
        s = self.spec
        device = torch.device(s["device"] or device or "cpu")
        images = self._ref_images()
        num_ref = {None: s["num_images"], "all": None}.get(s["num_ref"], s["num_ref"])  # None below: all
        if "shape" not in self._prepared:
            self._prepared["shape"] = tuple(images.shape[1:])
        if {"proxy_fd", "proxy_kid"} & set(s["metrics"]) and "proxy" not in self._prepared:
            ext = get_proxy(s["dataset"], s["resolution"], data_dir=s["data_dir"], cache_dir=s["cache_dir"],
                            seed=s["proxy_seed"], verbose=s["verbose"]).to(device)
            ref = reference_stats(ext, s["dataset"], s["ref_split"], num=num_ref, data_dir=s["data_dir"],
                                  cache_dir=s["cache_dir"], images=images, verbose=s["verbose"],
                                  compute_limit=self.compute_limit)
            self._prepared["proxy"] = (ext, ref, self._noise_floor(ext, ref, images, num_ref))
        if {"fid", "kid"} & set(s["metrics"]) and "inception" not in self._prepared:
            ext = get_inception(s["inception"], device, verbose=s["verbose"], mode=s["fid_mode"])
            if s["ref_stats"]:  # a published reference (mu, sigma): nothing to compute, no floor
                ref = external_stats(s["ref_stats"])
                floor = {"source": "not computed: external reference statistics", "fd": None, "kid": None,
                         "state": "not computable"}
            else:
                shards = [get_inception(s["inception"], d, mode=s["fid_mode"]) for d in shard_devices or []]
                ref = reference_stats(ext, s["dataset"], s["ref_split"], num=num_ref, data_dir=s["data_dir"],
                                      cache_dir=s["cache_dir"], images=images, verbose=s["verbose"],
                                      compute_limit=self.compute_limit, shards=shards or None)
                floor = self._noise_floor(ext, ref, images, num_ref)
            self._prepared["inception"] = (ext, ref, floor)
        return time.perf_counter() - t0

    def _real_images(self, ref_images: torch.Tensor, num_ref: int) -> tuple[torch.Tensor | None, str]:
        """num_images real images disjoint from the reference set: from the rest of the reference
        split when it has enough left, else from the other split (fixed subset, seed 1). None when
        there are not enough, with the reason (what the report prints instead of a floor)."""
        s, n = self.spec, self.spec["num_images"]
        idx = select_subset(len(ref_images), num_ref, 0)
        left = 0
        if idx is not None:
            rest = torch.ones(len(ref_images), dtype=torch.bool)
            rest[idx] = False
            rest = torch.nonzero(rest).flatten()
            left = len(rest)
            if len(rest) >= n:
                pick = rest[select_subset(len(rest), n, 1)] if len(rest) > n else rest
                return ref_images[pick], f"{n} real {s['ref_split']} images outside the reference subset"
        other = "train" if s["ref_split"] == "test" else "test"
        used = (f"the reference is all {len(ref_images):,} {s['ref_split']} images" if idx is None else
                f"{left:,} {s['ref_split']} images are outside the reference subset")
        try:
            images, _ = load_dataset(s["dataset"], split=other, data_dir=s["data_dir"], resolution=s["resolution"])
        except DatasetError:  # e.g. a prepared training set alone (imagenet128), all of it the reference
            return None, f"not computed: N = {n:,} real images are needed, {used}, and there is no {other} split"
        if len(images) < n:  # e.g. FID-50k on CIFAR-10, whose test split holds 10,000
            return None, (f"not computed: N = {n:,} real images are needed, {used}, and the {other} split holds "
                          f"{len(images):,}")
        pick = select_subset(len(images), n, 1)
        return (images if pick is None else images[pick]), f"{n} real {other} images"

    def _noise_floor(self, ext, ref, ref_images: torch.Tensor, num_ref: int) -> dict:
        """The metrics between real images and the reference at this N, cached beside the reference
        statistics (Inception takes minutes on a CPU): the floor no generator can beat on average.
        A floor without enough real images is cached too, as fd = kid = None and the reason, so
        every job proceeds without one and the report says why. The returned dict's `state` says
        what was done here: "computed", "cached" or "not computable" (never written to the file)."""
        s = self.spec
        cache = ref.path.with_name(f"{ref.path.stem}-floor{s['num_images']}-k{s['kid_subsets']}x"
                                   f"{s['kid_subset_size']}.json") if ref.path is not None else None
        damage = None
        if cache is not None and cache.is_file():
            cached, damage = read_cached_floor(cache, ref.sha256)
            if cached is not None:
                return {**cached, "state": "cached"}
        # Which real images (counts only) comes first: a floor that cannot be computed is no
        # reason to refuse a training job, whatever N is.
        images, source = self._real_images(ref_images, num_ref)
        floor = {"source": source, "fd": None, "kid": None, "ref_sha256": ref.sha256}
        if images is not None and self.compute_limit is not None and s["num_images"] > self.compute_limit:
            raise ConfigError(f"the noise floor at N = {s['num_images']:,} ({ext.name}) is "
                              f"{'not cached' if damage is None else f'damaged in the cache ({damage})'}, and a "
                              f"training job computes at most {self.compute_limit:,} images' features: run "
                              f"`python run_bench.py ref-stats SUITE` once")
        if damage is not None:
            print(f"note: noise floor {cache} is damaged ({damage}); recomputing it", file=sys.stderr)
        if images is not None:
            feats = ext.features(images)
            mu, sigma = feature_stats(feats)
            floor["fd"] = float(frechet_distance(mu, sigma, ref.mu, ref.sigma))
            floor["kid"] = float(kernel_distance(feats, ref.features(), num_subsets=s["kid_subsets"],
                                                 max_subset_size=s["kid_subset_size"], seed=0))
        if cache is not None:
            atomic_write_bytes(cache, (json.dumps(floor) + "\n").encode())
        return {**floor, "state": "computed" if images is not None else "not computable"}

    def _save_samples(self, images: torch.Tensor, name: str, out_dir) -> None:
        """samples/<name>.npz: arr_0 uint8 NHWC (and arr_1 the labels i mod K), the format of
        guided-diffusion's sample batches, so external evaluators can read them."""
        import io
        from pathlib import Path

        import numpy as np

        arrays = {"arr_0": images.permute(0, 2, 3, 1).contiguous().numpy()}
        if self.spec["num_classes"]:
            arrays["arr_1"] = np.arange(len(images), dtype=np.int64) % self.spec["num_classes"]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(Path(out_dir) / "samples" / f"{name}.npz", buf.getvalue())

    # -- the hook -----------------------------------------------------------------------------
    def evaluate(self, model, schedule, target: str, step: int, out_dir=None, samples_suffix: str = "",
                 noise_sets: int = 1) -> list[dict]:
        """Sample, score and return one row per metric; with save_samples, also write the samples
        into `out_dir`/samples/step<k><samples_suffix>.npz (the run folder). With `noise_sets` K > 1
        the same is done under K noise sets (noise_seed, noise_seed + 1, ...), each of num_images
        images, and a row's value is their mean (the Frechet distance's bias is the one at
        num_images, as on every other point of the curve), with set_values and value_sd beside it."""
        t0 = time.perf_counter()
        s = self.spec
        if s["guidance_scale"] != 1.0 and not s["num_classes"]:
            raise ConfigError("eval: guidance_scale needs a class-conditional model (num_classes > 0)")
        steps = check_sampler_args(s["sampler"], s["sampler_steps"], s["eta"], schedule.T, s["ddpm_variance"],
                                   s["timestep_spacing"])

        device = model_device(model)
        setup_seconds = self.prepare(device)
        precision = sample_precision(s["sample_precision"], device)
        per_set, sample_seconds = [], 0.0
        for j in range(max(1, int(noise_sets))):
            t1 = time.perf_counter()
            with sampling_in(precision, device):
                images = self._sample(model, schedule, target, steps, s["noise_seed"] + j)  # this rank's share
            sample_seconds += time.perf_counter() - t1
            if j == 0 and s["save_samples"] and out_dir is not None:
                everyone = torch.cat(gather_objects(images))
                if is_main():
                    self._save_samples(everyone, f"step{int(step):08d}{samples_suffix}", out_dir)
            with full_fp32():  # features as fp32 computes them, whatever the sampling precision
                per_set.append(self._score(images))
        eval_seconds = time.perf_counter() - t0

        ts = timestep_sequence(schedule.T, steps, s["timestep_spacing"])
        conditional = {"num_classes": s["num_classes"], "guidance_scale": float(s["guidance_scale"])} \
            if s["num_classes"] else {}
        if s["ref_stats"] or s["fid_mode"] != "clean":  # only then: older rows stay as they were
            conditional.update(fid_mode=s["fid_mode"], ref_stats=s["ref_stats"])
        if self._batch is not None and self._batch != s["batch_size"]:  # sized to fit, or halved on OOM
            conditional.update(sample_batch_size=self._batch, sample_batch_halvings=len(self._halvings))
        rows = []
        for k, (metric, _, ext, ref, floor, floor_source) in enumerate(per_set[0]):
            values = [float(scores[k][1]) for scores in per_set]
            spread = {"set_values": ",".join(repr(v) for v in values),
                      "value_sd": float(np.std(values, ddof=1))} if len(values) > 1 else {}
            rows.append({
                "step": int(step), "metric": metric, "value": float(np.mean(values)), "feature_extractor": ext.name,
                "num_gen": s["num_images"], "ref_split": s["ref_split"], "num_ref": int(ref.num),
                "ref_sha256": ref.sha256,
                "sampler": s["sampler"], "sampler_steps": steps, "sample_precision": precision,
                "eta": float(s["eta"]) if s["sampler"] == "ddim" else None,
                "eval_seconds": round(eval_seconds, 3),
                "dataset": s["dataset"], "resolution": int(self._prepared["shape"][-1]), "noise_seed": s["noise_seed"],
                "noise_sets": len(values), **spread,
                "weights_sha1": ext.weights_sha1, "weights_sha256": getattr(ext, "weights_sha256", None),
                "weights_shipped": getattr(ext, "shipped", None), "timestep_spacing": s["timestep_spacing"],
                "timesteps": ",".join(map(str, ts)), "noise_floor": floor, "noise_floor_source": floor_source,
                "sample_seconds": round(sample_seconds, 3), "setup_seconds": round(setup_seconds, 3), **conditional,
            })
        return rows

    def _sample(self, model, schedule, target: str, steps: int, noise_seed: int) -> torch.Tensor:
        """This rank's share of the num_images samples under `noise_seed` (all of them in a single
        process), as uint8. Image i's noise and label depend on i alone, so the union over ranks is
        the single process's set."""
        s, mine = self.spec, shard(self.spec["num_images"])
        if not len(mine):
            return torch.empty((0, *self._prepared["shape"]), dtype=torch.uint8)
        if self._batch is None:  # on a GPU, what fits beside what is there (the CPU's is the spec's)
            self._batch = sampling_batch(model, self._prepared["shape"], s["batch_size"], s["num_classes"],
                                         float(s["guidance_scale"]))
        x = sample(model, schedule, target, len(mine), self._prepared["shape"], start_index=mine.start,
                   batch_size=self._batch, on_halve=self._halved,
                   sampler=s["sampler"], steps=steps, eta=s["eta"], noise_seed=noise_seed, clip_x0=s["clip_x0"],
                   spacing=s["timestep_spacing"], ddpm_variance=s["ddpm_variance"], num_classes=s["num_classes"],
                   guidance_scale=float(s["guidance_scale"]))
        return to_uint8(x)

    def _halved(self, old: int, new: int) -> None:
        """A sampling batch ran out of CUDA memory: later ones are smaller too; said once per evaluation."""
        import sys

        if not self._halvings:
            print(f"eval: CUDA out of memory sampling {old} images at once: batches of {new} from now on (each "
                  "image's noise is its own, so the images are the same)", file=sys.stderr)
        self._halvings.append((old, new))
        self._batch = min(self._batch, new)

    def _score(self, images: torch.Tensor) -> list[tuple]:
        """(metric, value, extractor, reference, noise floor, its source) per configured metric, in
        the spec's order, over every rank's `images` (this rank's share)."""
        s, values = self.spec, []
        for family, fd_name, kid_name in (("proxy", "proxy_fd", "proxy_kid"), ("inception", "fid", "kid")):
            if family not in self._prepared:
                continue
            ext, ref, floor = self._prepared[family]
            # Every rank's features, in image order, on every rank (each then computes the same metrics).
            feats = np.concatenate([f for f in gather_objects(ext.features(images) if len(images) else None)
                                    if f is not None])
            if fd_name in s["metrics"]:
                mu, sigma = feature_stats(feats)
                values.append((fd_name, frechet_distance(mu, sigma, ref.mu, ref.sigma), ext, ref, floor["fd"],
                               floor["source"]))
            if kid_name in s["metrics"]:
                kid = kernel_distance(feats, ref.features(), num_subsets=s["kid_subsets"],
                                      max_subset_size=s["kid_subset_size"], seed=0)
                values.append((kid_name, kid, ext, ref, floor["kid"], floor["source"]))
        order = {m: k for k, m in enumerate(s["metrics"])}
        values.sort(key=lambda v: order[v[0]])
        return values
