import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

from bench.core.spec import Method, Param


def matching(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """order[i]: the noise row image i gets under the minimum-cost matching of images to noises on their L2
    distance (scipy's linear_sum_assignment, on the CPU in float64)."""
    cost = torch.cdist(x0.detach().flatten(1).double().cpu(), eps.detach().flatten(1).double().cpu()).numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return torch.from_numpy(order)


def share_of_global(x0_all: torch.Tensor, eps_all: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Process `rank`'s noise under one assignment over the global batch (every process's images and noise
    in rank order, `world` equal shares): the rows of the global matching that its own images get."""
    b = len(x0_all) // world
    order = matching(x0_all, eps_all)[rank * b:(rank + 1) * b]
    return eps_all[order.to(eps_all.device)]


def gathered(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every process's `x` (equal shapes), concatenated in rank order."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class Immiscible(Method):
    """Immiscible diffusion (Li et al. 2024; yhli123/Immiscible-Diffusion): the batch's noise, drawn as
    usual, is reassigned to the images by minimum-cost matching on the L2 distance between image and
    noise (scipy's linear_sum_assignment), so each noise marginal stays N(0, I) but is no longer
    independent of its image. The source claims up to 3x on CIFAR10; one independent
    re-implementation saw no effect.

    With several processes the source gathers every process's images and noise, solves one assignment
    over the global batch and gives each process the noise of its own images; so does this (scope =
    "global", the default): every process gathers both and solves the same assignment (on the CPU in
    float64, one host sync per step), so a run does not depend on its process count (the harness draws
    each sample's noise from its own generator, whichever process draws it). Option (off by default):
    scope = "process" matches within each process's share of the batch (no gathering; the suite's
    former reading, which depends on the process count). The source's variant (k noises per image, keep
    the nearest) is not implemented."""

    name = "immiscible"
    slots = frozenset({"noise"})
    source = "Li et al. 2024 (Immiscible Diffusion), yhli123/Immiscible-Diffusion"
    params = {"scope": Param("global", "one assignment over the global batch (the source's) or per process",
                             choices=("global", "process"))}

    def assign_noise(self, x0, eps):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1 or self.hp["scope"] == "process":
            return eps[matching(x0, eps).to(eps.device)]
        return share_of_global(gathered(x0.detach(), world), gathered(eps, world), dist.get_rank(), world)
