"""Print-ready figures and the compact LaTeX table (bench/report/figures.py, style.py, tables.py)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from bench.report import figures
from bench.report.figures import bin_positions, figure_curves, look_for, paired_difference_curve, training_figure_lines
from bench.report.stats import seed_curves, speedup_rows
from bench.report.style import BASELINE_COLOR, COLUMN_IN, CONTROL_COLOR, FULL_IN, Look
from bench.report.tables import latex_speedup

W = "synthetic-16_unet-tiny"
CONFIG = {"dataset": "synthetic", "resolution": 16, "arch": "unet-tiny"}
BUDGET = 400
# Large offsets that seed k of every method shares (the pairing cancels them), and a small spread of
# each method's own (so the paired differences have an interval).
SHARED = {0: -3.0, 1: 0.0, 2: 3.0, 3: 1.5}
OWN = {0: 0.1, 1: -0.1, 2: 0.05, 3: -0.05}
CURVES = {"baseline": ([100, 200, 400, 800], [10, 8, 6, 4]),  # extended to 2x the budget
          "clts": ([100, 200, 400], [9, 7, 5]), "laplace": ([100, 200, 400], [8, 5, 2]),  # beyond its curve
          "min_snr": ([100, 200, 400], [11, 9, 7]), "placebo": ([100, 200, 400], [10.2, 8.1, 6.1])}


def evals_frame(labels) -> pd.DataFrame:
    rows = []
    for i, label in enumerate(labels):
        steps, values = CURVES[label]
        for seed in SHARED:
            for step, v in zip(steps, values):
                rows.append({"workload": W, "metric": "proxy_fd", "method_label": label, "method": label, "seed": seed,
                             "step": step, "value": v + SHARED[seed] + i * OWN[seed], "num_gen": 64})
    return pd.DataFrame(rows)


@pytest.fixture
def captured(monkeypatch):
    """The figures a call draws, kept open instead of written."""
    figs = []

    def keep(fig, fig_dir, stem, tight=False):
        figs.append(fig)
        return stem

    monkeypatch.setattr(figures, "_save", keep)
    yield figs
    import matplotlib.pyplot as plt

    for f in figs:
        plt.close(f)


def curves(labels, look=None, **kw):
    look = look or Look(baseline="baseline", controls=("placebo",))
    return figure_curves(evals_frame(labels), W, "proxy_fd", 7.0, list(labels), None, look=look, budget=BUDGET, **kw)


def line(ax, gid):
    found = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    assert found, f"no line {gid} in {[ln.get_gid() for ln in ax.get_lines()]}"
    return found[0]


def test_a_methods_colour_does_not_depend_on_the_other_methods(captured):
    curves(["baseline", "clts", "laplace", "min_snr", "placebo"])
    curves(["baseline", "laplace"])  # clts, min_snr and the placebo dropped
    curves(["baseline", "min_snr", "clts"])
    full, few, other = (f.axes[0] for f in captured)
    assert line(full, "laplace").get_color() == line(few, "laplace").get_color()  # a plugin: by its name's hash
    assert line(full, "clts").get_color() == line(other, "clts").get_color()
    assert line(full, "min_snr").get_color() == line(other, "min_snr").get_color()
    colours = {line(full, m).get_color() for m in ("baseline", "clts", "laplace", "min_snr", "placebo")}
    assert len(colours) == 5


def test_baseline_is_black_and_the_placebo_grey_and_dashed_under_any_label(captured):
    runs = [{"label": "pl-2", "config": {"method": "placebo"}}, {"label": "clts", "config": {"method": "clts"}}]
    look = look_for({}, runs, "baseline")
    assert look.controls == ("pl-2",)
    frame = evals_frame(["baseline", "clts", "placebo"]).replace({"method_label": {"placebo": "pl-2"}})
    figure_curves(frame, W, "proxy_fd", None, ["baseline", "clts", "pl-2"], None, look=look, budget=BUDGET)
    ax, dax = captured[0].axes[:2]
    base, ctrl, clts = line(ax, "baseline"), line(ax, "pl-2"), line(ax, "clts")
    assert base.get_color() == BASELINE_COLOR and base.get_linestyle() == "-"
    assert ctrl.get_color() == CONTROL_COLOR and ctrl.get_linestyle() == "--"
    assert line(dax, "pl-2").get_linestyle() == "--"  # in the differences panel too
    assert clts.get_color() not in (BASELINE_COLOR, CONTROL_COLOR) and clts.get_linestyle() == "-"


def test_the_difference_panel_is_paired_like_the_tables(captured):
    """The panel's mean and interval at the budget are the table's paired final difference; the shared
    seed offsets (sd about 2.6) cancel, so the band is far narrower than an unpaired sd band."""
    frame = evals_frame(["baseline", "clts"])
    curves(["baseline", "clts"])
    rows = speedup_rows(frame, "baseline", ["baseline", "clts"], BUDGET, "proxy_fd", targets=[0.5], extend=2.0)
    d = next(r for r in rows if r["method_label"] == "clts")["final_diff"]
    base = seed_curves(frame[frame.method_label == "baseline"])
    meth = seed_curves(frame[frame.method_label == "clts"])
    curve = paired_difference_curve(base, meth, BUDGET, 0.95)
    assert curve[-1, 0] == BUDGET
    # the same float32-free float64 arithmetic on 4 values: equal to a few ulps
    np.testing.assert_allclose(curve[-1, 1:], [d.mean, d.ci_low, d.ci_high], rtol=1e-12)
    dax = captured[0].axes[1]
    np.testing.assert_allclose(line(dax, "clts").get_ydata(), curve[:, 1], rtol=1e-12)
    unpaired_sd = meth[1][:, -1].std(ddof=1)
    assert (d.ci_high - d.ci_low) / 2 < 0.2 * unpaired_sd


def test_log_axis_budget_marked_and_the_legend_outside_every_panel(captured):
    curves(["baseline", "clts", "placebo"])
    fig = captured[0]
    fig.canvas.draw()
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    box = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert any(list(ln.get_xdata()) == [BUDGET, BUDGET] for ln in ax.get_lines())  # the budget's line
        assert not box.overlaps(ax.get_window_extent())
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("F*") for t in texts)  # the target line is named in the legend, not covered by it


def test_display_names_and_titles_in_words(captured):
    look = Look(baseline="baseline", labels={"laplace": "Laplace (ours)"}, style="default")
    curves(["baseline", "laplace", "min_snr"], look=look, title="synthetic 16×16, U-Net (tiny)")
    fig = captured[0]
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "Laplace (ours)" in names and "Min-SNR" in names and "laplace" not in names
    title = fig._suptitle.get_text()
    assert "U-Net (tiny)" in title and W not in title and "proxy_fd" not in title
    curves(["baseline", "laplace"], look=Look(style="paper"))
    assert captured[1]._suptitle is None  # paper: the caption carries the title


def test_every_text_is_8_or_9_points(captured):
    curves(["baseline", "clts", "placebo"], look=Look(style="default"))
    fig = captured[0]
    fig.canvas.draw()  # tick labels exist once drawn
    sizes = {t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
             if t.get_text() and t.get_visible()}
    assert sizes and min(sizes) >= 8 and max(sizes) <= 9, sizes


def _media_box_in(pdf: bytes) -> float:
    box = re.search(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
    return float(box.group(1)) / 72


def test_pdfs_embed_truetype_fonts_at_print_widths(tmp_path):
    figure_curves(evals_frame(["baseline", "clts"]), W, "proxy_fd", None, ["baseline", "clts"], tmp_path,
                  look=Look(), budget=BUDGET)
    pdf = (tmp_path / f"curves_{W}_proxy_fd.pdf").read_bytes()
    assert b"/Type3" not in pdf and b"/FontFile2" in pdf  # TrueType (pdf.fonttype 42) embedded
    assert _media_box_in(pdf) == pytest.approx(FULL_IN, abs=1 / 72)
    figures.figure_timesteps({"clts": {"progress": [0, 1], "timestep_probs": [[0.25] * 4, [0.1, 0.7, 0.1, 0.1]]}},
                             W, tmp_path, Look())
    assert _media_box_in((tmp_path / f"timesteps_{W}.pdf").read_bytes()) == pytest.approx(COLUMN_IN, abs=1 / 72)
    if shutil.which("pdffonts"):
        out = subprocess.run(["pdffonts", str(tmp_path / f"curves_{W}_proxy_fd.pdf")], capture_output=True,
                             text=True, check=True).stdout
        assert "Type 3" not in out and "TrueType" in out


def test_the_latex_table_is_compact_typeset_and_a_valid_tabular(tmp_path):
    labels = ["baseline", "clts", "laplace", "min_snr", "placebo"]
    frame = evals_frame(labels)
    frame.loc[frame.method_label == "placebo", "method"] = "placebo"
    rows = speedup_rows(frame, "baseline", labels, BUDGET, "proxy_fd", targets=[0.5], extend=2.0)
    assert next(r for r in rows if r["method_label"] == "laplace")["equiv"].lower_bound
    look = Look(baseline="baseline", labels={"laplace": "Laplace (ours)"})
    tex = latex_speedup(rows, metric="proxy_fd", workload="synthetic 16×16", look=look, confidence=0.95,
                        label="tab:x")
    for part in (r"\toprule", r"\midrule", r"\bottomrule", r"\times", r"\geq", "$-$", "Laplace (ours)"):
        assert part in tex, part
    assert "Laplace (ours)" in tex and "laplace " not in tex and ">=" not in tex
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    assert spec == "lrr"  # method, speed-up, final difference
    body = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    rows_tex = [ln for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("\\midrule")]
    assert len(rows_tex) == 1 + 4  # header, three methods and the placebo (the baseline is the reference)
    for ln in rows_tex:
        assert ln.endswith(r" \\") and len(re.findall(r"(?<!\\)&", ln)) == len(spec) - 1, ln
    assert not re.search(r"(?<![$\w])-\d", tex)  # no hyphen-minus before a number
    assert all(r"\times" in ln.split("&")[1] for ln in rows_tex[1:])  # 1.23$\times$, never 1.23x
    # a bound: its mark, its footnote after the tabular, and no interval
    lap = next(ln for ln in rows_tex if ln.startswith("Laplace"))
    assert r"\geq" in lap.split("&")[1] and r"\textsuperscript{a}" in lap and "[" not in lap.split("&")[1]
    notes = tex.split(r"\end{tabular}")[1]
    assert r"\textsuperscript{a}" in notes and "lower bound" in notes
    # one precision per column
    for col, want in ((1, {2}), (2, None)):
        decimals = {len(x.split(".")[1]) for ln in rows_tex[1:]
                    for x in re.findall(r"\d+\.\d+", ln.split("&")[col])}
        assert len(decimals) == 1 and (want is None or decimals == want), (col, decimals)
    assert "placebo" in body.split(r"\midrule")[-1]  # the control under its own rule
    if shutil.which("pdflatex"):  # it typesets, within a 3.3 in column
        doc = tmp_path / "doc.tex"
        doc.write_text("\n".join([r"\documentclass{article}", r"\usepackage[utf8]{inputenc}", r"\usepackage{booktabs}",
                                  r"\setlength{\textwidth}{3.3in}", r"\begin{document}", tex, r"\end{document}"]))
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                             capture_output=True, text=True)
        assert run.returncode == 0 and "Overfull" not in run.stdout, run.stdout[-2000:]


def write_run(root, label, seed, slots, T=8, iters=40):
    d = root / W / label / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {**CONFIG, "method": label, "iters": iters, "method_slots": slots}
    steps = []
    for step in range(1, iters + 1):
        steps.append({"step": step, "loss": 1.0, "lr": 1e-3 * (1 - step / iters if "optimizer" in slots else 1),
                      "beta1": 0.9 - (0.4 * step / iters if "optimizer" in slots else 0),
                      **{f"loss_q{k}": (k + 1) * (1 + 10 / step) for k in range(4)}})
    (d / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    spike = [1.0 if t == 3 else 0.0 for t in range(T)] if "timesteps" in slots else [1 / T] * T
    (d / "method_trace.json").write_text(json.dumps({"progress": [0.0, 1.0], "timestep_probs": [spike, spike]}))
    return {"label": label, "seed": seed, "workload": W, "dir": d, "config": cfg}


def test_training_figures_only_for_the_slots_in_use(tmp_path, captured):
    runs = [write_run(tmp_path, m, 0, s) for m, s in (("baseline", []), ("clts", ["timesteps"]), ("p2", ["weighting"]))]
    look = Look(baseline="baseline")
    md = "\n".join(training_figure_lines(runs, W, ["baseline", "clts", "p2"], tmp_path / "figures", look))
    assert "optimizer_" not in md and "beta1" not in md  # no method has an optimizer slot
    assert f"timesteps_{W}" in md and f"loss_over_t_{W}" in md and "loss_quartiles" not in md
    runs.append(write_run(tmp_path, "mdlrc", 0, ["optimizer"]))
    md = "\n".join(training_figure_lines(runs, W, ["baseline", "clts", "mdlrc", "p2"], tmp_path / "figures", look))
    assert f"optimizer_{W}" in md
    opt = next(f for f in captured if f.axes[0].get_ylabel().startswith("Adam"))
    assert {ln.get_gid() for ln in opt.axes[0].get_lines()} == {"baseline", "mdlrc"}


def test_the_loss_over_t_is_a_curve_over_t_at_the_samples_mean_t(tmp_path, captured):
    """Uniform p(t) on T = 8: quartile bins {0,1}, {2,3}, {4,5}, {6,7}, mean t 0.5, 2.5, 4.5, 6.5; a method
    that samples only t = 3 puts its second bin at 3 / 8. A point is the mean of the steps' bin means."""
    assert bin_positions({"progress": [0, 1], "timestep_probs": [[1 / 8] * 8] * 2}, 0, 1) == \
        pytest.approx(np.array([0.5, 2.5, 4.5, 6.5]) / 8)
    runs = [write_run(tmp_path, "baseline", 0, []), write_run(tmp_path, "clts", 0, ["timesteps"])]
    training_figure_lines(runs, W, ["baseline", "clts"], tmp_path / "figures", Look(baseline="baseline"))
    fig = next(f for f in captured if f.axes[0].get_ylabel().startswith("training MSE"))
    last = fig.axes[-1]  # 75-100% of the budget: steps 31..40 of 40
    clts = line(last, "clts")
    assert clts.get_xdata()[1] == pytest.approx(3 / 8) and np.isnan(clts.get_xdata()[0])
    want = np.mean([2 * (1 + 10 / s) for s in range(31, 41)])  # loss_q1 of those steps, each weighted once
    assert line(last, "baseline").get_ydata()[1] == pytest.approx(want, rel=1e-12)


def test_the_report_writes_the_compact_table_and_only_the_slots_figures(tmp_path):
    """End to end: suite.json's labels reach speedup.tex and the figures; no optimizer figure without the slot."""
    from test_report import write_run as write_report_run

    from bench.report.build import build_report

    root = tmp_path / "demo"
    for seed in (0, 1, 2):
        write_report_run(root, "baseline", seed)
        write_report_run(root, "fast", seed)
    (root / "suite.json").write_text(json.dumps({"name": "demo", "report": {
        "metric": "proxy_fd", "baseline": "baseline", "bootstrap": 0, "labels": {"fast": "Fast (ours)"}}}))
    md = build_report(root).read_text()
    tex = (root / "tables" / "speedup.tex").read_text()
    assert r"\begin{tabular}{lrr}" in tex and "Fast (ours)" in tex and r"\times" in tex
    figs = {p.name for p in (root / "figures").iterdir()}
    assert f"loss_over_t_{W}.png" in figs and f"timesteps_{W}.pdf" in figs
    assert not any(f.startswith(("optimizer_", "loss_quartiles_")) for f in figs)
    assert f"figures/loss_over_t_{W}.png" in md and "optimizer_" not in md


def test_a_sample_grid_fits_the_page_width_in_8_point_labels(tmp_path):
    """Ten noises by seven runs (the mini suite's grid) within the full width, labels at print size."""
    images = np.zeros((7, 10, 12, 12, 1), np.uint8)
    figures.figure_image_grid(images, [f"run{r}" for r in range(7)], [f"noise {c}" for c in range(10)], tmp_path, "g")
    width_in = _media_box_in((tmp_path / "g.pdf").read_bytes())
    assert width_in <= FULL_IN + 0.05, width_in  # tight bbox: the labels' width decides, within 0.05 in


def test_the_over_training_axes_read_as_plain_numbers(tmp_path, monkeypatch):
    """Log axes labelled "200" and "0.9x", not powers of ten (a reader of a printed page)."""
    import matplotlib.pyplot as plt

    from bench.report import over_training

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    table = pd.DataFrame({"workload": W, "metric": "proxy_fd", "method_label": ["min_snr"] * 2, "step": [100, 200],
                          "speedup": [1.0, 0.82], "ci_low": [np.nan, 0.78], "ci_high": [np.nan, 0.86], "bound": ["", ""]})
    assert over_training.figure_over_training(table, W, "proxy_fd", tmp_path, Look()) is not None
    fig = kept[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_xticklabels(minor=False) + ax.get_yticklabels(minor=False)
             + ax.get_yticklabels(minor=True) if t.get_text()]
    assert "100" in texts and "200" in texts and any(t.endswith("x") for t in texts), texts
    assert not any("10^" in t or "\\times" in t or "mathdefault" in t for t in texts), texts
    sizes = {t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
             if t.get_text() and t.get_visible()}
    assert min(sizes) >= 8 and max(sizes) <= 9, sizes
    plt.close(fig)


def test_the_over_training_legend_and_labels_overlap_nothing(tmp_path, monkeypatch):
    """Seven methods from 0.6x to 3x: the legend sits outside the axes, no two y labels touch."""
    import matplotlib.pyplot as plt

    from bench.report import over_training

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    labels = ["baseline", "clts", "p2", "min_snr", "edm", "speed", "logit_normal"]
    speed = {"baseline": 1.0, "clts": 1.3, "p2": 0.65, "min_snr": 0.9, "edm": 0.8, "speed": 1.5, "logit_normal": 3.1}
    table = pd.DataFrame([{"workload": W, "metric": "proxy_fd", "method_label": m, "step": s, "speedup": speed[m],
                           "ci_low": speed[m] * 0.9, "ci_high": speed[m] * 1.1, "bound": ""}
                          for m in labels for s in (500, 1000, 1500, 2000)])
    assert over_training.figure_over_training(table, W, "proxy_fd", tmp_path, Look()) is not None
    fig = kept[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = fig.legends[0] if fig.legends else ax.get_legend()
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    boxes = sorted((t.get_window_extent(renderer) for t in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)
                    if t.get_text() and t.get_visible() and ax.get_ylim()[0] <= t.get_position()[1] <= ax.get_ylim()[1]),
                   key=lambda b: b.y0)
    assert len(boxes) >= 3 and all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:])), [(b.y0, b.y1) for b in boxes]
    plt.close(fig)
