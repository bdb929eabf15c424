import copy

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.spec import AuxModule, Method, Param


class RepaHead(nn.Module):
    """REPA's trainable projector (D -> hidden -> hidden -> teacher width, SiLU, applied at every position)
    beside the frozen teacher (kept in eval mode: its batch norms must not learn)."""

    def __init__(self, width: int, hidden: int, teacher: nn.Module, teacher_width: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, teacher_width))
        self.teacher = teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self


def tokens(activation: torch.Tensor) -> torch.Tensor:
    """[B, N, D] positions of a feature map [B, D, H, W] or of transformer tokens [B, N, D]."""
    return activation.flatten(2).transpose(1, 2) if activation.ndim == 4 else activation


SOURCE_DEPTH, SOURCE_BLOCKS = 8, 28  # the source's encoder depth 8 on SiT-XL/2's 28 blocks


def default_layer(model: nn.Module) -> str:
    """The inner layer REPA aligns by default: a transformer's output of block d (1-based; blocks[d - 1]), as
    the source's encoder depth d reads it after its d-th block, d = 8 for 28 blocks and scaled to other depths
    (d = round(8 N / 28), at least 1: the suite's reading); a U-Net's first middle block."""
    if hasattr(model, "mid"):
        return "mid.0"
    if hasattr(model, "blocks"):
        depth = max(1, round(SOURCE_DEPTH * len(model.blocks) / SOURCE_BLOCKS))
        return f"blocks.{depth - 1}"
    from bench.errors import HyperparameterError  # reason: only this refusal needs it

    raise HyperparameterError("method 'repa': this network has neither a middle block ('mid') nor 'blocks'; set "
                              "layer= to one of its module names")


class REPA(Method):
    """Representation alignment (Yu et al. 2024; sihyun-yu/REPA ``loss.py``).

    L = L_denoise + lam * mean over positions of -cos(teacher features of the clean image, MLP projection
    of the denoiser's inner feature map at `layer`). The projector D -> proj_dim -> proj_dim -> teacher
    width with SiLU joins the optimizer, the checkpoint and DDP; the teacher is frozen. The default layer
    is the source's: the output of a transformer's 8th block of 28 (``blocks.7``; the source's encoder
    depth d is blocks[d - 1]), scaled to other depths; a U-Net's first middle block.

    Reconstruction: the source's teacher is DINOv2-B, which this suite cannot download. Like DINOv2, the
    teacher is not the network that scores the samples: it is a classifier of the proxy's architecture
    trained with its own seed (bench/eval/teacher.py, cached as "<proxy name>-teacher"), never the one
    proxy_fd loads; its last convolutional stage (128 channels), average-pooled to the denoiser's grid.
    It is trained once per dataset, resolution and cache, on the run's device (its first job's: the
    others wait for it under a lock, then load it); a dataset without a test split (imagenet128) trains it
    on nine tenths of its train split. The run records it (method_trace.json "aux" -> "teacher": name,
    seed, weights' SHA-256). Option (off by default): teacher = "metric" aligns to the evaluation's own
    proxy classifier (get_proxy, seed 0), the suite's former default: a confound for proxy_fd."""

    name = "repa"
    slots = frozenset({"aux_loss"})
    source = "Yu et al. 2024 (REPA), loss.py; the teacher (a classifier of its own, not the metric's) is the suite's"
    params = {
        "lam": Param(0.5, "weight of the alignment loss", low=0.0),
        "layer": Param("auto", "the network's inner module to align (a name from model.named_modules())"),
        "proj_dim": Param(2048, "projector hidden width", low=1),
        "teacher": Param("separate", "separate: a classifier of its own seed; metric: proxy_fd's own network",
                         choices=("separate", "metric")),
    }

    def build_aux(self, model, image_shape, dataset, data_dir):
        from bench.eval.proxy import get_proxy  # reason: the teachers' loaders, needed only when a run starts
        from bench.eval.teacher import get_teacher, identity  # reason: as above

        layer = default_layer(model) if self.hp["layer"] == "auto" else self.hp["layer"]
        width = self._probe_width(model, layer, image_shape)
        device = next(model.parameters()).device  # the run's: a teacher not cached is trained there
        load = get_teacher if self.hp["teacher"] == "separate" else get_proxy
        ext = load(dataset, image_shape[-1], data_dir=data_dir, device=device)
        net = copy.deepcopy(ext.model)  # not the cached instance
        teacher = net.body[:-2]  # up to the last stage's ReLU: 4 x width channels, before pooling and flatten
        teacher_width = teacher[-3].out_channels
        return AuxModule(layer, RepaHead(width, self.hp["proj_dim"], teacher, teacher_width),
                         record={"teacher": identity(ext, self.hp["teacher"])})

    @staticmethod
    def _probe_width(model, layer, image_shape) -> int:
        """The channel (token) width of `layer`'s output, from one forward pass of a zero image."""
        modules = dict(model.named_modules())
        if layer not in modules:
            from bench.errors import HyperparameterError  # reason: only this refusal needs it

            raise HyperparameterError(f"method 'repa': the network has no layer {layer!r}; set layer= to a name "
                                      f"from its modules, e.g. {', '.join(n for n in list(modules)[1:6])}")
        caught = {}
        handle = modules[layer].register_forward_hook(lambda _m, _i, out: caught.setdefault("out", out))
        device = next(model.parameters()).device
        x, t = torch.zeros(1, *image_shape, device=device), torch.zeros(1, dtype=torch.long, device=device)
        labels = torch.zeros(1, dtype=torch.long, device=device)
        with torch.no_grad():
            try:
                model(x, t)
            except (TypeError, ValueError, RuntimeError):  # a class-conditional network wants labels
                model(x, t, labels)
        handle.remove()
        out = caught.get("out")
        if not torch.is_tensor(out) or out.ndim not in (3, 4):
            from bench.errors import HyperparameterError  # reason: only this refusal needs it

            what = "is never called in a forward pass" if out is None else f"outputs {tuple(getattr(out, 'shape', ()))}"
            raise HyperparameterError(f"method 'repa': layer {layer!r} {what}; set layer= to a module whose output is a "
                                      "feature map [B, C, H, W] or tokens [B, N, D], e.g. mid.0 or blocks.3")
        return out.shape[1] if out.ndim == 4 else out.shape[-1]

    def aux_loss(self, aux, activation, x0):
        with torch.autocast(x0.device.type, enabled=False):  # the alignment in fp32, whatever the network's precision
            with torch.no_grad():
                target = aux.teacher(x0.float())
            z = aux.proj(tokens(activation).float())  # [B, N, teacher width]
            grid = (activation.shape[-2:] if activation.ndim == 4 else (int(z.shape[1] ** 0.5),) * 2)
            target = tokens(F.adaptive_avg_pool2d(target, grid))  # [B, N, teacher width]
            return -self.hp["lam"] * F.cosine_similarity(z, target, dim=-1).mean(dim=1)
