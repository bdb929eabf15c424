"""`run_bench.py consistency`: the measures against brute force, their reference levels (copies of
one model agree exactly, two unrelated networks sit at the different-noise level, a model agrees with
itself at every t), the selectors, the report, and one-line errors."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.core.diffusion import make_schedule
from bench.errors import ConfigError
from bench.report.consistency import agreement, cosines, pair_row, pixel_distances, psnr
from bench.tools.consistency import Model, pairs_table, predictions_over_t, same_noise_samples, select_runs
from bench.train.loop import TrainConfig, train

# --------------------------------------------------------------------------- the arithmetic


def test_pixel_distances_match_every_pair_by_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.random((7, 5)), rng.random((7, 5))
    same = np.mean([((a[i] - b[i]) ** 2).mean() for i in range(7)])
    different = np.mean([((a[i] - b[j]) ** 2).mean() for i in range(7) for j in range(7) if i != j])
    assert pixel_distances(a, b) == pytest.approx((same, different), rel=1e-12)


def test_cosines_match_every_pair_by_brute_force():
    rng = np.random.default_rng(1)
    fa, fb = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))

    def cos(u, v):
        return u @ v / np.linalg.norm(u) / np.linalg.norm(v)

    same = np.mean([cos(fa[i], fb[i]) for i in range(6)])
    different = np.mean([cos(fa[i], fb[j]) for i in range(6) for j in range(6) if i != j])
    assert cosines(fa, fb) == pytest.approx((same, different), rel=1e-12)


def test_identical_sets_agree_exactly():
    a = np.random.default_rng(2).random((5, 12))
    row = pair_row(a, a.copy(), a, a.copy())
    assert row["rmse_same"] == 0.0 and row["psnr_same"] == math.inf and row["agreement"] == 1.0
    assert row["cosine_same"] == pytest.approx(1.0, abs=1e-12)
    assert row["rmse_different"] > 0 and row["cosine_different"] < 1
    assert psnr(0.01) == pytest.approx(20.0)
    assert agreement(0.0, 0.0) == 1.0 and math.isnan(agreement(0.1, 0.0)) and agreement(1.0, 4.0) == 0.75


# --------------------------------------------------------------------------- networks


class RandomX0(torch.nn.Module):
    """An x0-predicting network of random weights: what it draws says nothing about another's."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(48, 256, generator=g) / 48 ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(256, 48, generator=g) / 256 ** 0.5)

    def forward(self, x, t):
        return torch.tanh(torch.tanh(x.flatten(1) @ self.w1) @ self.w2 * 3).view_as(x)


def _model(net, label):
    cfg = TrainConfig(dataset="synthetic", target="x0", T=20, schedule="cosine")
    return Model(run=None, cfg=cfg, spec={}, step=0, net=net.eval(), num_classes=0, label=label)


SETTINGS = {"sampler": "ddim", "steps": 5, "eta": 0.0, "spacing": "trailing", "ddpm_variance": "large",
            "noise_seed": 3, "clip_x0": True}


def test_two_unrelated_random_networks_sit_at_the_different_noise_level():
    models = [_model(RandomX0(1), "a"), _model(RandomX0(2), "b")]
    schedule = make_schedule("cosine", 20)
    images = same_noise_samples(models, schedule, (3, 4, 4), 400, SETTINGS)
    pairs = pairs_table(images, None, ["a", "b"]).set_index(["model_a", "model_b"])
    ab = pairs.loc[("a", "b")]
    assert abs(ab.agreement) < 0.05, ab  # same noise no closer than different noise
    assert ab.rmse_same == pytest.approx(ab.rmse_different, rel=0.03)
    assert pairs.loc[("a", "a")].rmse_same == 0.0 and pairs.loc[("a", "a")].rmse_different > 0.1
    # A copy of a network draws the very same images from the same noise.
    copy = _model(RandomX0(1), "a2")
    again = same_noise_samples([copy], schedule, (3, 4, 4), 400, SETTINGS)["a2"]
    assert torch.equal(again, images["a"])


def test_per_timestep_agreement_of_a_model_with_a_copy_is_1_at_every_t():
    models = [_model(RandomX0(1), "a"), _model(RandomX0(1), "copy"), _model(RandomX0(2), "other")]
    schedule = make_schedule("cosine", 20)
    x0 = torch.randint(0, 256, (32, 3, 4, 4), dtype=torch.uint8)
    pairs, errors = predictions_over_t(models, schedule, x0, [0, 5, 10, 19], noise_seed=0)
    same = pairs[(pairs.model_a == "a") & (pairs.model_b == "copy")]
    assert len(same) == 4
    assert (same.agreement_truth == 1.0).all() and (same.agreement_inputs == 1.0).all()
    assert (same.agreement_inputs_eps == 1.0).all() and (same.rmse_same == 0.0).all()
    other = pairs[(pairs.model_a == "a") & (pairs.model_b == "other")]
    assert (other.agreement_truth < 0.9).all()
    assert set(errors.columns) == {"t", "model", "rmse_truth", "eps_rmse_truth"} and len(errors) == 12


# --------------------------------------------------------------------------- the command on trained runs


SPEC = {"metrics": ["proxy_fd"], "num_images": 12, "sampler_steps": 3, "batch_size": 12, "save_samples": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two seeds of the baseline and one of p2, 4 iterations each, evaluations (samples saved) at 2 and 4."""
    root = tmp_path_factory.mktemp("consistency") / "suite" / "synthetic-16_unet-micro"
    runs = {}
    for method, seed in (("baseline", 0), ("baseline", 1), ("p2", 0)):
        out = root / method / f"seed{seed}"
        train(TrainConfig(method=method, dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, eval_every=2,
                          ckpt_every=2, seed=seed, eval=SPEC), out)
        runs[(method, seed)] = out
    return root.parent, runs


def test_copies_of_one_run_agree_exactly_and_the_report_says_so(trained, tmp_path):
    _, runs = trained
    copy = tmp_path / "copy" / "baseline" / "seed0"
    shutil.copytree(runs[("baseline", 0)], copy)
    out = tmp_path / "out"
    assert main(["consistency", str(runs[("baseline", 0)]), str(copy), "--out", str(out), "--x0-images", "16",
                 "--t-points", "5", "--grid-columns", "3"]) == 0
    pairs = pd.read_csv(out / "tables" / "pairs.csv")
    off = pairs[pairs.model_a != pairs.model_b]
    assert len(off) == 2 and (off.rmse_same == 0).all() and np.isinf(off.psnr_same).all()
    assert (off.agreement == 1).all() and np.allclose(off.cosine_same, 1.0)
    over_t = pd.read_csv(out / "tables" / "over_t.csv")
    assert len(over_t) == 5 and (over_t.agreement_truth == 1).all() and (over_t.agreement_inputs == 1).all()
    training = pd.read_csv(out / "tables" / "over_training.csv")
    assert sorted(training.step.unique()) == [0, 2, 4] and (training[training.model_a != training.model_b].agreement == 1).all()
    meta = json.loads((out / "consistency.json").read_text())
    assert [m["label"] for m in meta["models"]] == ["baseline/seed0", "baseline/seed0#2"]
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (2, 3, 16, 16, 1) and z["images"].dtype == np.uint8
    report = (out / "report.md").read_text()
    assert "RMSE 0.000 for the same noise" in report and "PSNR inf dB" in report
    for fig in ("consistency_matrix", "consistency_over_t", "consistency_over_training", "consistency_grid"):
        assert (out / "figures" / f"{fig}.png").is_file()


def test_the_same_noise_reproduces_the_runs_saved_samples(trained, tmp_path):
    """Sampling from a checkpoint gives the evaluation's own images: the noise is the evaluation's."""
    _, runs = trained
    out = tmp_path / "out"
    assert main(["consistency", str(runs[("baseline", 0)]), str(runs[("baseline", 1)]), "--out", str(out),
                 "--x0-images", "8", "--t-points", "2", "--grid-columns", "12"]) == 0
    with np.load(out / "samples.npz") as z, np.load(runs[("baseline", 0)] / "samples" / "step00000004.npz") as saved:
        assert np.array_equal(z["images"][0], saved["arr_0"])


def test_selectors_pick_all_seeds_of_a_method_or_one_seed_of_every_method(trained, tmp_path):
    suite, runs = trained
    assert select_runs([suite.name], suite.parent, methods=["baseline"]) == [runs[("baseline", 0)], runs[("baseline", 1)]]
    assert select_runs([str(suite)], tmp_path, seeds=[0]) == [runs[("baseline", 0)], runs[("p2", 0)]]
    with pytest.raises(ConfigError, match="at least 2 runs, the selection has 1"):
        select_runs([str(suite)], tmp_path, methods=["p2"])
    # The default output: the suite's consistency folder, named after the selectors.
    assert main(["--results", str(suite.parent), "consistency", suite.name, "--seed", "0", "--x0-images", "8",
                 "--t-points", "2"]) == 0
    meta = json.loads((suite / "consistency" / "seed-0" / "consistency.json").read_text())
    assert [m["label"] for m in meta["models"]] == ["baseline/seed0", "p2/seed0"]
    assert "--seed=0" in meta["command"]
    # Its own output folder is never read as runs.
    assert len(select_runs([str(suite)], tmp_path)) == 3


def test_step_0_is_the_network_training_started_from(trained):
    """The untrained reference rebuilds each run's initial network exactly as training's setup does."""
    from bench.core.registry import get_method
    from bench.tools.consistency import initial_network, load_model
    from bench.train.loop import setup

    _, runs = trained
    model = load_model(runs[("baseline", 1)], torch.device("cpu"))
    rebuilt = initial_network(model).net.state_dict()
    started = setup(model.cfg, get_method("baseline", {})).model.state_dict()
    assert rebuilt.keys() == started.keys() and all(torch.equal(rebuilt[k], started[k]) for k in started)
    trained_weights = model.net.state_dict()
    assert any(not torch.equal(trained_weights[k], started[k]) for k in started)  # and training moved it


def test_bad_input_gets_one_line(trained, tmp_path, capsys):
    _, runs = trained
    assert main(["consistency", str(tmp_path / "nowhere"), str(runs[("p2", 0)])]) == 2
    assert "neither a run folder nor a suite" in capsys.readouterr().err
    empty = tmp_path / "empty" / "baseline" / "seed0"
    empty.mkdir(parents=True)
    shutil.copy(runs[("baseline", 0)] / "config.json", empty / "config.json")
    assert main(["consistency", str(empty), str(runs[("p2", 0)]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint.pt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "report.md").exists()
