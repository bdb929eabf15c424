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


def default_layer(model: nn.Module) -> str:
    """The inner layer REPA aligns by default: a U-Net's first middle block; a transformer's block at a
    third of its depth (REPA: block 8 of SiT-XL/2's 28)."""
    if hasattr(model, "mid"):
        return "mid.0"
    if hasattr(model, "blocks"):
        return f"blocks.{max(0, len(model.blocks) // 3 - 1)}"
    from bench.errors import HyperparameterError  # reason: only this refusal needs it

    raise HyperparameterError("method 'repa': this network has neither a middle block ('mid') nor 'blocks'; set "
                              "layer= to one of its module names")


class REPA(Method):
    """Representation alignment (Yu et al. 2024; sihyun-yu/REPA ``loss.py``).

    L = L_denoise + lam * mean over positions of -cos(teacher features of the clean image, MLP projection
    of the denoiser's inner feature map at `layer`). The projector D -> proj_dim -> proj_dim -> teacher
    width with SiLU joins the optimizer, the checkpoint and DDP; the teacher is frozen.

    Reconstruction: the source's teacher is DINOv2-B, which this suite cannot download; the teacher is
    the suite's proxy classifier for the dataset (bench/eval/proxy.py: shipped for Fashion-MNIST and the
    synthetic set, trained on the dataset's training split otherwise), its last convolutional stage
    (128 channels), average-pooled to the denoiser's grid. The default layer is the U-Net's first middle
    block or a transformer's block at a third of its depth.

    A teacher that is not shipped is trained once per dataset, resolution and cache, on the run's device
    (its first job's: the others wait for it under a lock, then load it). A dataset without a test split
    (imagenet128) trains it on nine tenths of its train split, holding out the rest to check its accuracy
    on (get_proxy's rule; the record says so)."""

    name = "repa"
    slots = frozenset({"aux_loss"})
    source = "Yu et al. 2024 (REPA), loss.py; the proxy-classifier teacher and the layer choice are the suite's"
    params = {
        "lam": Param(0.5, "weight of the alignment loss", low=0.0),
        "layer": Param("auto", "the network's inner module to align (a name from model.named_modules())"),
        "proj_dim": Param(2048, "projector hidden width", low=1),
    }

    def build_aux(self, model, image_shape, dataset, data_dir):
        from bench.eval.proxy import get_proxy  # reason: the teacher's loader, needed only when a run starts

        layer = default_layer(model) if self.hp["layer"] == "auto" else self.hp["layer"]
        width = self._probe_width(model, layer, image_shape)
        device = next(model.parameters()).device  # the run's: a teacher not shipped is trained there
        proxy = get_proxy(dataset, image_shape[-1], data_dir=data_dir, device=device)
        proxy = copy.deepcopy(proxy.model)  # not the evaluator's
        teacher = proxy.body[:-2]  # up to the last stage's ReLU: 4 x width channels, before pooling and flatten
        teacher_width = teacher[-3].out_channels
        return AuxModule(layer, RepaHead(width, self.hp["proj_dim"], teacher, teacher_width))

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
