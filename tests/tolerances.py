"""Tolerances for two runs that differ only in the order of their float32 sums.

One process or two, another thread count, another machine's kernels: the same sums, added in
another order. A float32 sum of n terms is within (n - 1) u of the exact sum in ANY order, relative
to the sum of the terms' magnitudes (u = 2^-24, one rounding; Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., section 4.2), so two orders are within 2 n u of each other. Built
from that bound, a tolerance holds whatever order a machine's kernels pick; it is not fitted to one.

Margin: the bound is the worst case, every rounding the same way; rounding errors of random sign
give sqrt(n) u, so the bound sits sqrt(n) above the typical difference (64 at n = 4096). That
factor covers what the first-order count leaves out: terms of both signs, the network's depth,
a metric computed from the sums. (This project's 2-core CPU, 1 vs 3 threads: 1e-3 of the bound or less.)

A training step's longest reordered sums are the weight gradients' sums over the batch's pixels
(B x H x W terms, split among processes or threads); its other sums are shorter (a convolution's
fan-in C x 9, a sample's MSE over H x W). Each step adds its own error to what the weights carry
from the steps before: after k steps, k passes. See the derivation beside each use.
"""

import math

import pytest
import torch

U = 2.0 ** -24  # unit roundoff of float32: the relative error of one rounding

# Sums of the proxy extractor's features at 16 px (bench/eval/proxy.py, width 32): conv fan-ins
# 1 x 9, 32 x 9, 64 x 9 and the linear layer's 128 x 2 x 2: each layer adds its own sum's error.
PROXY_FEATURE_TERMS_16PX = 9 + 288 + 576 + 512
# FD is quadratic and KID cubic in the features: a relative error e in them moves the metric by
# up to 3 e (first order, for a metric of the order of its terms; see the module's margin).
METRIC_DEGREE = 3


def reordered(n_terms: int, passes: int = 1) -> float:
    """Relative distance bound of two orders of `passes` successive float32 sums of n_terms each."""
    return 2 * passes * n_terms * U


def gradient_terms(batch: int, pixels: int) -> int:
    """Terms of a step's longest reordered sum: a weight gradient summed over the batch's pixels."""
    return batch * pixels


def largest_tensor(state: dict) -> int:
    return max(v.numel() for v in state.values())


def step_tolerances(step: int, n_terms: int, norm_terms: int) -> dict:
    """Relative tolerance of each steps.jsonl value at `step` (1-based).

    loss, mse, loss_q*: the step's forward sums on weights that carry step - 1 steps' gradient
    errors; k passes of n_terms bound both. grad_norm: the gradients' k passes, plus its own sum
    of squares over the largest tensor (like-signed terms: 2 m u apart, halved by the square root)."""
    loss = reordered(n_terms, step)
    return {"loss": loss, "mse": loss, **{f"loss_q{i}": loss for i in range(4)},
            "grad_norm": loss + norm_terms * U}


def assert_steps_close(a_rows: list[dict], b_rows: list[dict], n_terms: int, norm_terms: int,
                       keys=("loss", "mse", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm")) -> None:
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for x, y in zip(a_rows, b_rows):
        tol = step_tolerances(x["step"], n_terms, norm_terms)
        for key in keys:
            if x[key] is None:  # an empty timestep quartile: empty in both
                assert y[key] is None, (x["step"], key)
            else:
                assert y[key] == pytest.approx(x[key], rel=tol[key], abs=0), (x["step"], key, tol[key])


def relative_distance(a: dict, b: dict, init: dict) -> float:
    """||b - a|| / ||a - init|| over every tensor of a state together, in float64."""
    diff = math.fsum(float((b[k].double() - a[k].double()).square().sum()) for k in a)
    moved = math.fsum(float((a[k].double() - init[k].double()).square().sum()) for k in a)
    return math.sqrt(diff / moved)


def assert_weights_close(a: dict, b: dict, init: dict, rel: float, what: str) -> None:
    """Norm-wise, relative to how far training moved them. Not elementwise: Adam divides each
    gradient by its own running scale, so a weight whose gradient nearly cancels (terms much larger
    than their sum) takes a step set by round-off, anywhere within +-lr, in any order of sums; such
    weights are few, and the norm of all of them follows the gradients' relative error."""
    assert a.keys() == b.keys() == init.keys(), what
    d = relative_distance(a, b, init)
    assert d <= rel, f"{what}: ||b - a|| = {d:.3g} x ||a - init||, over the tolerance {rel:.3g}"


def bit_identical(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def forward_terms(model: torch.nn.Module, x: torch.Tensor, *args) -> int:
    """The longest sum of one forward pass: convolution and linear fan-ins, group-norm groups."""
    longest = [0]

    def hook(module, inputs, _output):
        if isinstance(module, torch.nn.Conv2d):
            n = module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, torch.nn.Linear):
            n = module.in_features
        else:  # GroupNorm: mean and variance over a group's channels and pixels
            n = inputs[0][0].numel() // module.num_groups
        longest[0] = max(longest[0], n)

    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x, *args)
    finally:
        for h in handles:
            h.remove()
    return longest[0]


def evaluation_tolerance(train_steps: int, train_terms: int, sampler_steps: int, net_terms: int,
                         feature_terms: int = PROXY_FEATURE_TERMS_16PX) -> float:
    """Relative tolerance of a metric (FD, KID) of two runs: the weights carry train_steps passes of
    train_terms, each sampler step adds one network pass, the extractor one; x METRIC_DEGREE.
    (Images are rounded to uint8 before the features: a pixel within the float difference of a
    rounding boundary moves by one level, an effect of the same first order in that difference.)"""
    passes = train_steps * train_terms + sampler_steps * net_terms + feature_terms
    return METRIC_DEGREE * reordered(passes)
