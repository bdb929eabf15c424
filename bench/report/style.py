"""How the report's figures look: one colour per method that never depends on which other methods a
suite runs, display names, titles in words, print sizes and fonts. Files only, no torch.

Colours: Okabe & Ito's colour-blind-safe set, then Paul Tol's "muted" set, as a fixed map for the
built-in methods; any other label gets a colour and a marker by a stable hash of its name (SHA-256,
never Python's per-process hash), so adding or dropping a method leaves every other colour as it was.
The baseline is black, the placebo (and any control label) grey and dashed.

Sizes: a column is 3.3 in wide, a full page 6.9 in; fonts 8 pt (titles 9 pt), as they print. PDFs
embed TrueType fonts (pdf.fonttype 42): Type 3 fonts are refused by some publishers and do not
select as text.
"""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass, field

COLUMN_IN = 3.3  # one column of a two-column paper, inches
FULL_IN = 6.9    # the full text width, inches
FONT_PT = 8
TITLE_PT = 9

BASELINE_COLOR = "#000000"
CONTROL_COLOR = "#8c8c8c"
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442"]
TOL_MUTED = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499"]
PALETTE = [c for c in OKABE_ITO + TOL_MUTED if c not in ("#F0E442", "#DDCC77")]  # yellow, sand: faint as lines
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]

# The built-in methods' colours and markers: fixed, so a figure of any subset keeps them.
BUILTIN = {
    "clts": ("#D55E00", "o"), "mdlrc": ("#0072B2", "s"), "combined": ("#CC79A7", "D"), "p2": ("#E69F00", "^"),
    "min_snr": ("#009E73", "v"), "soft_min_snr": ("#56B4E9", "P"), "logit_normal": ("#882255", "X"),
    "edm": ("#332288", "<"), "debiased": ("#999933", ">"), "speed": ("#44AA99", "h"), "loss_aware": ("#CC6677", "o"),
    "immiscible": ("#AA4499", "s"), "repa": ("#117733", "^"), "power_ema": ("#88CCEE", "D"),
}
BUILTIN_NAMES = {
    "baseline": "baseline", "placebo": "placebo", "clts": "CLTS", "mdlrc": "MDLRC", "combined": "CLTS + MDLRC",
    "p2": "P2", "min_snr": "Min-SNR", "soft_min_snr": "soft Min-SNR", "logit_normal": "logit-normal", "edm": "EDM",
    "debiased": "debiased", "speed": "SpeeD", "loss_aware": "loss-aware", "immiscible": "immiscible",
    "repa": "REPA", "power_ema": "power EMA",
}
METRIC_WORDS = {"proxy_fd": "Fréchet distance (proxy features)", "proxy_kid": "KID (proxy features)",
                "fid": "FID", "kid": "KID"}
DATASET_WORDS = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "imagenet128": "ImageNet",
                 "synthetic": "synthetic images", "folder": "image folder"}
ARCH_WORDS = {"unet-micro": "U-Net (micro)", "unet-tiny": "U-Net (tiny)", "ddpm-unet": "DDPM U-Net",
              "adm-unet": "ADM U-Net"}


def _digest(text: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{text}".encode()).digest()[:8], "big")


def is_control_label(label: str, controls=()) -> bool:
    return label == "placebo" or label.startswith("placebo-") or label in set(controls)


def method_style(label: str, baseline: str | None = "baseline", controls=()) -> dict:
    """Line keywords (color, ls, marker, lw, zorder) of one method label: a function of the label alone."""
    if label == baseline:
        return {"color": BASELINE_COLOR, "ls": "-", "marker": "o", "lw": 1.4, "zorder": 4}
    if is_control_label(label, controls):
        return {"color": CONTROL_COLOR, "ls": "--", "marker": "o", "lw": 1.0, "zorder": 2}
    color, marker = BUILTIN.get(label) or (PALETTE[_digest(label, "color") % len(PALETTE)],
                                           MARKERS[_digest(label, "marker") % len(MARKERS)])
    return {"color": color, "ls": "-", "marker": marker, "lw": 1.1, "zorder": 3}


def display_name(label: str, labels: dict | None = None) -> str:
    """The name a reader sees: the suite's [report] labels, else a built-in's usual spelling, else the label."""
    return (labels or {}).get(label) or BUILTIN_NAMES.get(label) or label


METRIC_SHORT = {"proxy_fd": "FD", "proxy_kid": "KID", "fid": "FID", "kid": "KID"}


def metric_short(metric: str) -> str:
    return METRIC_SHORT.get(metric.removesuffix("_final"), metric)


def metric_words(metric: str) -> str:
    base = metric.removesuffix("_final")
    words = METRIC_WORDS.get(base, base.replace("_", " "))
    return words + (" at the end of the budget" if metric.endswith("_final") else "")


def workload_words(workload: str, config: dict | None = None) -> str:
    """"Fashion-MNIST 12x12, U-Net (micro)" from a run's config; the workload's name without one."""
    cfg = config or {}
    if not cfg.get("dataset"):
        return workload.replace("_", ", ")
    data = DATASET_WORDS.get(cfg["dataset"], cfg["dataset"])
    res = f" {cfg['resolution']}×{cfg['resolution']}" if cfg.get("resolution") else ""
    arch = str(cfg.get("arch") or "")
    arch = ARCH_WORDS.get(arch) or ("DiT-" + arch[4:].upper() if arch.startswith("dit-") else arch)
    return f"{data}{res}" + (f", {arch}" if arch else "")


def rc_params() -> dict:
    """matplotlib settings for print: sizes in points, TrueType fonts, no box around legends."""
    rc = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
          "font.size": FONT_PT, "axes.titlesize": TITLE_PT, "axes.labelsize": FONT_PT, "xtick.labelsize": FONT_PT,
          "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT, "figure.titlesize": TITLE_PT,
          "legend.frameon": False, "lines.markersize": 3.5, "axes.linewidth": 0.6, "grid.linewidth": 0.4,
          "xtick.major.width": 0.6, "ytick.major.width": 0.6, "savefig.dpi": 200, "mathtext.fontset": "dejavusans"}
    return rc


def figsize(width: str, height_in: float) -> tuple[float, float]:
    """(width, height) in inches for a "column" or a "full"-width figure."""
    return (COLUMN_IN if width == "column" else FULL_IN, height_in)


@dataclass
class Look:
    """What every figure of one report shares: the suite's [report] labels and style, the baseline,
    and the control labels (a placebo under any label)."""

    baseline: str | None = "baseline"
    labels: dict = field(default_factory=dict)
    style: str = "paper"
    controls: tuple = ()

    def name(self, label: str) -> str:
        return display_name(label, self.labels)

    def line(self, label: str) -> dict:
        """matplotlib line keywords, with the label as the artist's gid (an SVG id; tests find lines by it)."""
        return {**method_style(label, self.baseline, self.controls), "gid": label}

    def title(self, target, text: str, width_in: float | None = None) -> None:
        """A panel's title, or a figure's (suptitle, wrapped to `width_in`): none in the paper style,
        where report.md's heading and a paper's caption say it."""
        if not hasattr(target, "suptitle"):
            target.set_title(text, fontsize=FONT_PT)
        elif self.style != "paper":
            # about 13 characters per inch at 9 pt: a title never runs past the figure's edge
            target.suptitle(textwrap.fill(text, int(13 * width_in)) if width_in else text)


def runs_workload_words(runs: list[dict], workload: str) -> str:
    """workload_words from the first run of `workload` among the report's runs."""
    return workload_words(workload, next((r["config"] for r in runs if r["workload"] == workload), None))
