"""Samplers for evaluation: DDIM (Song et al. 2021) and ancestral DDPM (Ho et al. 2020).

Both work for eps-, x0- and v-prediction models: every model output goes through
``schedule.predict_x0_eps(target, x_t, t, out)`` and the update is written in terms of
(x0_hat, eps_hat). Images are processed in batches; only the noise draw is per image.

Fixed evaluation noise
----------------------
Image number i (counted from 0 over the whole evaluation) takes all of its noise, the initial
x_T and then one draw per stochastic step, from its own ``torch.Generator`` seeded with
``image_seed(noise_seed, i)``. The draws come in a fixed order (x_T first, then one per step,
top step first), so image i gets exactly the same noise whatever the batch size, the batch it
lands in, the training method, the training seed or the iteration being evaluated, and the
noise never depends on the global torch RNG. Noise is drawn on the CPU and then moved to the
model's device, so it is also the same on every device.

The schedule's tables are put on the model's device once per :func:`sample` call
(:func:`schedule_on`). On a GPU the batch is what the memory free holds by an activation estimate
(:func:`sampling_batch`) and is halved when it runs out of memory anyway: the images are the same.

Timesteps: t in 0..T-1, t = 0 the least noisy (bench/core/diffusion.py). A sampler with S steps
visits S timesteps in decreasing order and finishes with x0_hat at the last one.

Quantisation: :func:`to_uint8` maps [-1, 1] to 0..255 exactly as
``torchvision.utils.save_image((x + 1) / 2, ...)`` does before writing a PNG (multiply by 255,
add 0.5, clamp, truncate), so an in-memory uint8 batch equals what a PNG round trip reads back.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.core.diffusion import Schedule
from bench.errors import ConfigError

SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("trailing", "leading", "linspace", "quadratic")
DDPM_VARIANCES = ("large", "small")
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- fixed noise


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def image_seed(noise_seed: int, index: int) -> int:
    """The seed of image `index` under `noise_seed`: splitmix64 of both, 63 bits.

    A pure function of the two integers (no global state), so it is the same in every
    process, run and batch layout.
    """
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return _splitmix64(_splitmix64(int(noise_seed) & _MASK64) ^ int(index)) & ((1 << 63) - 1)


def image_generators(noise_seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per image index, each seeded by :func:`image_seed`."""
    gens = []
    for i in indices:
        g = torch.Generator(device="cpu")
        g.manual_seed(image_seed(noise_seed, int(i)))
        gens.append(g)
    return gens


def draw_noise(gens: list[torch.Generator], shape, device=None) -> torch.Tensor:
    """The next standard normal draw of shape `shape` from each generator, stacked: [B, *shape]."""
    out = torch.empty((len(gens), *shape), dtype=torch.float32)
    for k, g in enumerate(gens):
        torch.randn(shape, generator=g, out=out[k])
    return out if device is None else out.to(device)


# --------------------------------------------------------------------------- timesteps


def timestep_sequence(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """`steps` distinct timesteps in 0..T-1, in decreasing order (the order of sampling).

    - "trailing" (Lin et al. 2024): round(T - k T / steps) - 1 for k = 0..steps-1; always
      starts at T-1, the noisiest step, and for steps = T it is T-1, ..., 0.
    - "leading" (DDIM's "uniform"): k * (T // steps) for k = 0..steps-1, reversed.
    - "linspace": round(linspace(0, T-1, steps)), reversed.
    - "quadratic" (after DDIM's "quad" selection, Song et al. 2021, here spanning the whole
      chain): round((T-1) (k / (steps-1))^2) for k = 0..steps-1, reversed. Starts at T-1, ends at
      0, and puts more steps where the noise is low: with T = 1000 and 10 steps, 999, 789, 604,
      444, 308, 197, 111, 49, 12, 0 (above 45 steps it would repeat small t: refused).
    "linspace", "leading" and "quadratic" end at t = 0; "trailing" with few steps never visits
    small t (10 steps stop at 99), so a metric read through it ignores the low-noise end.
    """
    if not isinstance(steps, int) or steps < 1 or steps > T:
        raise ConfigError(f"sampler steps must be an integer in 1..{T}, got {steps!r}")
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(steps) * (T // steps))[::-1]
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)[::-1]
    elif spacing == "quadratic":
        ts = np.round((T - 1) * np.linspace(0, 1, steps) ** 2).astype(np.int64)[::-1] if steps > 1 else np.array([T - 1])
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    ts = [int(t) for t in ts]
    if len(set(ts)) != len(ts):  # quadratic spacing with many steps rounds small t together
        raise ConfigError(f"{steps} steps with {spacing} spacing repeat a timestep; use fewer steps or another spacing")
    return ts


# --------------------------------------------------------------------------- samplers


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _wants_channels_last(model: torch.nn.Module) -> bool:
    for p in model.parameters():
        if p.ndim == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _step_coefficients(ab: float, ab_prev: float, sampler: str, eta: float, ddpm_variance: str):
    """Coefficients of x_prev = c_x0 * x0_hat + c_eps * eps_hat + sigma * z (all Python floats).

    DDIM (Song et al. 2021, eq. 12): sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev),
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z.
    DDPM (Ho et al. 2020), on the (possibly respaced) chain with beta = 1 - ab / ab_prev:
    the posterior mean sqrt(ab_prev) beta / (1 - ab) x0_hat + sqrt(1 - beta) (1 - ab_prev) / (1 - ab) x_t,
    rewritten with x_t = sqrt(ab) x0_hat + sqrt(1 - ab) eps_hat, and sigma^2 = beta ("large",
    the DDPM paper's CIFAR10 choice) or the posterior variance (1 - ab_prev) / (1 - ab) beta
    ("small"; then DDPM equals DDIM with eta = 1).
    """
    if sampler == "ddim":
        if ab_prev >= 1.0 or ab >= 1.0:
            sigma = 0.0
        else:
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(max(0.0, 1 - ab / ab_prev))
        c_eps = math.sqrt(max(0.0, 1 - ab_prev - sigma**2))
        return math.sqrt(ab_prev), c_eps, sigma
    beta = 1 - ab / ab_prev
    # Mean coefficients on x0_hat and x_t, then substitute x_t.
    c0 = math.sqrt(ab_prev) * beta / (1 - ab)
    ct = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
    c_x0 = c0 + ct * math.sqrt(ab)
    c_eps = ct * math.sqrt(1 - ab)
    if ab_prev >= 1.0:
        sigma = 0.0  # the last step returns the mean (DDPM adds no noise at t = 0)
    elif ddpm_variance == "large":
        sigma = math.sqrt(beta)
    else:
        sigma = math.sqrt((1 - ab_prev) / (1 - ab) * beta)
    return c_x0, c_eps, sigma


def check_sampler_args(sampler: str, steps, eta: float, T: int, ddpm_variance: str = "large",
                       spacing: str = "trailing") -> int:
    """Validate sampler settings; return the number of steps (None means T for ddpm, 50 for ddim)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if steps is None:
        steps = T if sampler == "ddpm" else min(50, T)
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ConfigError(f"sampler_steps must be an integer in 1..{T}, got {steps!r}")
    if not (isinstance(eta, (int, float)) and 0.0 <= float(eta) <= 1.0):
        raise ConfigError(f"eta must be a number in [0, 1], got {eta!r}")
    if ddpm_variance not in DDPM_VARIANCES:
        raise ConfigError(f"unknown ddpm_variance {ddpm_variance!r}; use one of {', '.join(DDPM_VARIANCES)}")
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    if T < 10**6:  # callers without a schedule pass a huge T to check the rest only
        timestep_sequence(T, steps, spacing)
    return steps


@torch.inference_mode()
def sample_batch(model, schedule, target: str, indices, shape, *, sampler: str = "ddim", steps=None,
                 eta: float = 0.0, noise_seed: int = 0, clip_x0: bool = True, spacing: str = "trailing",
                 ddpm_variance: str = "large", device=None, num_classes: int = 0,
                 guidance_scale: float = 1.0) -> torch.Tensor:
    """Generate the images with the given global indices in one batch.

    Returns float32 [len(indices), *shape] on the CPU, clamped to [-1, 1].
    `clip_x0` clamps x0_hat to [-1, 1] at every step and recomputes eps_hat from it (as the
    DDPM reference code and diffusers' DDIM do); turning it off (for unbounded data, e.g. the
    tests' Gaussian) also leaves the output unclamped (:func:`to_uint8` clamps in any case).
    A class-conditional model (num_classes K > 0) gives image i the label i mod K; with
    guidance_scale s != 1 each step also runs the null label and uses u + s (c - u).
    """
    steps = check_sampler_args(sampler, steps, eta, schedule.T, ddpm_variance, spacing)
    device = torch.device(device) if device is not None else model_device(model)
    shape = tuple(int(s) for s in shape)
    indices = [int(i) for i in indices]
    B = len(indices)
    ts = timestep_sequence(schedule.T, steps, spacing)
    ab_table = schedule.alphas_bar.double().cpu().tolist()  # the step coefficients, as Python floats
    schedule = schedule_on(schedule, device)  # x0_hat and eps_hat's per-image tables: moved once, not per step
    stochastic = sampler == "ddpm" or eta > 0
    channels_last = _wants_channels_last(model)  # feed a channels_last model (bench.train.loop's default) in kind

    gens = image_generators(noise_seed, indices)
    x = draw_noise(gens, shape, device)
    net = _conditional(model, indices, num_classes, guidance_scale, device)
    for k, t in enumerate(ts):
        t_prev = ts[k + 1] if k + 1 < len(ts) else -1
        ab = ab_table[t]
        ab_prev = ab_table[t_prev] if t_prev >= 0 else 1.0
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        out = net(x.contiguous(memory_format=torch.channels_last) if channels_last else x, tt).float()
        x0_hat, eps_hat = schedule.predict_x0_eps(target, x, tt, out)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            if ab < 1.0:
                eps_hat = (x - math.sqrt(ab) * x0_hat) / math.sqrt(1.0 - ab)
        if t_prev < 0:
            x = x0_hat
            break
        c_x0, c_eps, sigma = _step_coefficients(ab, ab_prev, sampler, float(eta), ddpm_variance)
        x_new = c_x0 * x0_hat + c_eps * eps_hat
        if stochastic:
            # Drawn at every non-final step of a stochastic sampler (even if sigma is 0), so
            # the k-th draw of image i always belongs to the k-th step.
            z = draw_noise(gens, shape, device)
            if sigma > 0:
                x_new = x_new + sigma * z
        x = x_new
    return (x.clamp(-1.0, 1.0) if clip_x0 else x).float().cpu()


class _ScheduleOn(Schedule):
    """A schedule whose square-root tables are computed once and held on one device: the sampler's
    steps index them there (schedule.predict_x0_eps would copy both tables host-to-device at every
    step). The values are those of Schedule.sqrt_ab and sqrt_1mab, bit for bit."""

    def sqrt_ab(self, t, like):
        return self._on_device[0][t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def sqrt_1mab(self, t, like):
        return self._on_device[1][t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def schedule_on(schedule: Schedule, device) -> Schedule:
    """`schedule` with its tables on `device`, once (itself when they are there already)."""
    device = torch.device(device)
    if isinstance(schedule, _ScheduleOn) and schedule._on_device[0].device == device:
        return schedule
    out = _ScheduleOn(**{f.name: getattr(schedule, f.name) for f in dataclasses.fields(Schedule)})
    out._on_device = (schedule.alphas_bar.sqrt().to(device), (1 - schedule.alphas_bar).sqrt().to(device))
    return out


def _conditional(model, indices: list[int], num_classes: int, guidance_scale: float, device):
    """The network as sampling calls it, (x, t) -> output: labels i mod K, and guidance."""
    if not num_classes:
        return model
    y = torch.tensor([i % num_classes for i in indices], dtype=torch.long, device=device)
    if guidance_scale == 1.0:
        return lambda x, t: model(x, t, y)
    null = torch.full_like(y, num_classes)

    def guided(x, t):
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return guided


def sample(model, schedule, target: str, num_images: int, shape, *, batch_size: int = 250,
           start_index: int = 0, on_halve=None, **kwargs) -> torch.Tensor:
    """Generate images start_index .. start_index + num_images - 1 in batches of `batch_size`.

    Keyword arguments are those of :func:`sample_batch` (sampler, steps, eta, noise_seed,
    clip_x0, spacing, ddpm_variance, device, num_classes, guidance_scale). Returns float32 [N, *shape] in [-1, 1] on the CPU.
    The result does not depend on batch_size. The model is put in eval mode for the call and
    restored afterwards. A batch that runs out of CUDA memory is halved and run again (down to one
    image); `on_halve(old, new)` hears of each halving.
    """
    if num_images < 1:
        raise ConfigError(f"num_images must be >= 1, got {num_images}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(kwargs["device"]) if kwargs.get("device") is not None else model_device(model)
    schedule = schedule_on(schedule, device)  # once per call: every batch's steps index it there
    was_training = model.training
    model.eval()
    try:
        chunks, lo, end = [], start_index, start_index + num_images
        while lo < end:
            hi = min(lo + batch_size, end)
            try:
                chunks.append(sample_batch(model, schedule, target, range(lo, hi), shape, **kwargs))
                lo = hi
                continue
            except torch.cuda.OutOfMemoryError:
                if hi - lo == 1:
                    raise
            # Outside the except clause, so that the failed batch's tensors are free to be released.
            batch_size = (hi - lo) // 2  # image i's noise is its own: the images do not change
            if on_halve is not None:
                on_halve(hi - lo, batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        model.train(was_training)
    return torch.cat(chunks)


# --------------------------------------------------------------------------- the batch that fits


class _LiveBytes(TorchDispatchMode):
    """The most bytes of tensors alive at once among those made inside it (views and in-place results
    share their storage's count; a storage is free when its last tensor dies)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._refs = 0, 0, {}

    def _release(self, key) -> None:
        nbytes, count = self._refs[key]
        if count > 1:
            self._refs[key] = (nbytes, count - 1)
        else:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for r in tree_leaves(out):
            if isinstance(r, torch.Tensor):
                key = r.untyped_storage()._cdata
                nbytes, count = self._refs.get(key, (r.untyped_storage().nbytes(), 0))
                if not count:
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._refs[key] = (nbytes, count + 1)
                weakref.finalize(r, self._release, key)
        return out


def activation_bytes(model, shape, num_classes: int = 0, guidance_scale: float = 1.0) -> int:
    """Bytes of the activations alive at once while the network maps one image in one sampling step
    (two forwards' worth with guidance), in fp32: the network run on the meta device, where the
    shapes are computed and nothing is allocated, its tensors' lifetimes followed by _LiveBytes.
    bf16 sampling needs less (autocast keeps the norms in fp32): an upper bound there."""
    meta = torch.device("meta")
    state = {n: torch.empty_like(v, device=meta) for n, v in [*model.named_parameters(), *model.named_buffers()]}
    net = _conditional(lambda *a: functional_call(model, state, a), [0], num_classes, guidance_scale, meta)
    with torch.inference_mode(), _LiveBytes() as live:
        x = torch.empty((1, *shape), device=meta)
        out = net(x, torch.zeros(1, dtype=torch.long, device=meta))
        del x, out
    return live.peak


def fit_batch(requested: int, per_image: int, free_bytes: int, margin: float = 0.85) -> int:
    """The largest batch up to `requested` whose activations (per_image each, plus the sampler's own
    few image-sized tensors, inside it) fill at most `margin` of the free memory: the rest is left to the
    allocator's fragmentation, cuDNN's workspaces and autocast's weight copies. At least 1."""
    return max(1, min(int(requested), int(margin * free_bytes) // max(1, int(per_image))))


def sampling_batch(model, shape, requested: int, num_classes: int = 0, guidance_scale: float = 1.0) -> int:
    """The sampling batch for `model` on its device: on a CUDA GPU the requested one, or fewer when
    the activation estimate says it does not fit in the memory free now (the allocator's cached,
    unused blocks count as free); on a CPU the requested one (the numbers stay those of before)."""
    device = model_device(model)
    if device.type != "cuda":
        return int(requested)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        net_bytes = activation_bytes(model, shape, num_classes, guidance_scale)
    except Exception:  # noqa: BLE001 - an operator without a meta kernel: halving on out-of-memory remains
        return int(requested)
    # The sampler holds x, x0_hat, eps_hat, the update and the noise: 8 fp32 images' worth beside the network's.
    return fit_batch(requested, net_bytes + 8 * 4 * math.prod(shape), free)


# --------------------------------------------------------------------------- images


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8, as torchvision's save_image((x + 1) / 2) writes a PNG."""
    return ((x.float() + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_pngs(images_uint8: torch.Tensor, folder, start_index: int = 0, prefix: str = "") -> list[Path]:
    """Write uint8 images [N, C, H, W] (C = 1 or 3) as lossless PNGs named {prefix}{index:06d}.png."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = images_uint8.cpu().numpy()
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1|3, H, W], got {arr.dtype} {arr.shape}")
    paths = []
    for k, img in enumerate(arr):
        p = folder / f"{prefix}{start_index + k:06d}.png"
        pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        pil.save(p)
        paths.append(p)
    return paths
