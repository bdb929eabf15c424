"""Speed benchmark of the training harness (not a test): `python -m bench.tools.speed_harness`.

Measures, in one process, on unet-tiny at batch 128 (Fashion-MNIST 28x28 by default):
  (a) the harness's median step time against a minimal hand-written loop of the same model,
      batch, optimizer, gradient clipping and EMA update (target ratio <= 1.05);
  (b) every method's median step time against the baseline's (target <= 1.03).
Measurements alternate between contenders in rounds (order rotated each round), so drift in
machine load hits all alike.
"""

import argparse
import copy
import statistics
import time

from bench.core.perf import tune_allocator

tune_allocator()

import torch  # noqa: E402

from bench.core.config import TrainConfig  # noqa: E402
from bench.core.diffusion import make_schedule  # noqa: E402
from bench.data.loading import load_dataset, to_model_range  # noqa: E402
from bench.models.networks import build_model  # noqa: E402
from bench.train.loop import setup, train_step  # noqa: E402
from bench.train.resolve import resolve_run  # noqa: E402

METHODS = ["baseline", "p2", "min_snr", "clts", "mdlrc", "combined", "speed", "edm", "logit_normal", "soft_min_snr",
           "debiased", "loss_aware", "immiscible", "repa", "power_ema"]


def minimal_loop(images, steps, batch, arch, seed=0):
    """The least a DDPM training step needs; returns per-step seconds."""
    torch.manual_seed(seed)
    sch = make_schedule()
    model = build_model(arch, images.shape[1], images.shape[-1]).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, foreach=True)
    ab = sch.alphas_bar.float()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        x0 = to_model_range(images[torch.randint(len(images), (batch,))])
        t = torch.randint(1000, (batch,))
        eps = torch.randn_like(x0)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).contiguous(memory_format=torch.channels_last)
        loss = (model(x_t, t) - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), params, 0.001)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


def harness_steps(method, steps, batch, arch, dataset, resolution):
    """Seconds of each of `steps` calls of bench.train.loop.train_step, the step every run takes (its
    own clock: from drawing the batch to the logged row; the run folder's I/O is not a step's)."""
    cfg = TrainConfig(method=method, dataset=dataset, resolution=resolution, arch=arch, iters=steps,
                      batch_size=batch)
    state = setup(cfg, resolve_run(cfg).method)
    state.model.train()
    return [batch / train_step(state)["images_per_s"] for _ in range(steps)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="steps per measurement block (first 2 dropped)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--arch", default="unet-tiny")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--resolution", type=int, default=None)
    args = ap.parse_args()
    images, _ = load_dataset(args.dataset, "train", None, args.resolution)
    res = {k: [] for k in ["minimal"] + METHODS}
    names = list(res)
    for r in range(args.rounds):
        # Rotate the order every round, so drift within a round does not favour anyone.
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name == "minimal":
                times = minimal_loop(images, args.steps, args.batch, args.arch, seed=r)
            else:
                times = harness_steps(name, args.steps, args.batch, args.arch, args.dataset, args.resolution)
            res[name] += times[2:]  # the first steps warm up caches and the allocator
            print(f"round {r} {name:9s} median step {statistics.median(times[2:]) * 1e3:7.1f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nunet-tiny, batch {args.batch}, {images.shape[-1]}x{images.shape[-1]}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps - 2} steps")
    print(f"(a) harness baseline / minimal loop: {med['baseline'] / med['minimal']:.3f}  "
          f"({med['baseline'] * 1e3:.1f} ms vs {med['minimal'] * 1e3:.1f} ms)")
    for m in METHODS[1:]:
        print(f"(b) {m:9s} / baseline: {med[m] / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
