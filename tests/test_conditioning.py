"""Class conditioning (labels, label dropout, sampling labels i mod K, guidance) and the FID
options that make numbers comparable with papers (fid_mode, ref_stats, save_samples)."""

import numpy as np
import pytest
import torch
from conftest import needs_inception, train_until

from bench.errors import ConfigError
from bench.eval.sampling import sample
from bench.eval.spec import resolve_spec
from bench.train.loop import TrainConfig, train


class Recorder(torch.nn.Module):
    """A fake network: output = (label + 1) / 10 everywhere, recording the labels it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(None if y is None else y.tolist())
        value = torch.zeros(len(x)) if y is None else (y.float() + 1) / 10
        return value.view(-1, 1, 1, 1).expand_as(x) + 0 * self.w


def test_sampling_gives_image_i_the_label_i_mod_k_with_the_same_noise():
    from bench.core.diffusion import make_schedule

    sch = make_schedule()
    net = Recorder()
    x_cond = sample(net, sch, "x0", 7, (1, 4, 4), batch_size=3, steps=1, num_classes=3)
    assert net.seen == [[0, 1, 2], [0, 1, 2], [0]]  # images 0-2, 3-5, 6: labels i mod 3
    # With one step to t = 0 an x0-model's output is the sample: image i is (i mod 3 + 1) / 10.
    assert torch.allclose(x_cond[:, 0, 0, 0], torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1]))


def test_guidance_mixes_the_conditional_and_the_null_outputs():
    from bench.core.diffusion import make_schedule

    sch = make_schedule()
    net = Recorder()
    x = sample(net, sch, "x0", 2, (1, 2, 2), batch_size=2, steps=1, num_classes=4, guidance_scale=3.0,
               clip_x0=False)
    assert net.seen == [[0, 1, 4, 4]]  # one forward of conditional and null labels together
    # u + s (c - u): null label 4 -> 0.5; labels 0, 1 -> 0.1, 0.2
    expected = torch.tensor([0.5 + 3 * (0.1 - 0.5), 0.5 + 3 * (0.2 - 0.5)])
    assert torch.allclose(x[:, 0, 0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("spec, what", [
    ({"fid_mode": "tf"}, "fid_mode"),
    ({"ref_stats": "/nonexistent/ref.npz"}, "ref_stats"),
    ({"num_classes": -1}, "num_classes"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number >= 0"),
])
def test_bad_evaluation_options_are_one_line(spec, what):
    with pytest.raises(ConfigError, match=what):
        resolve_spec(spec)


def test_kid_cannot_use_external_statistics(tmp_path):
    p = tmp_path / "ref.npz"
    np.savez(p, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ConfigError, match="kid needs"):
        resolve_spec({"metrics": ["fid", "kid"], "ref_stats": str(p)})


@pytest.mark.parametrize("arrays, what", [
    (dict(m=np.zeros(2048), s=np.eye(2)), "not an .npz with mu and sigma"),
    (dict(mu=np.zeros(10), sigma=np.eye(10)), r"mu \(10,\) and sigma \(10, 10\) are not Inception pool features"),
])
def test_a_ref_stats_file_without_inception_statistics_is_refused_when_the_spec_is_read(tmp_path, arrays, what):
    p = tmp_path / "ref.npz"
    np.savez_compressed(p, **arrays)
    with pytest.raises(ConfigError, match=what):
        resolve_spec({"metrics": ["fid"], "ref_stats": str(p)})
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not an .npz with mu and sigma"):
        resolve_spec({"metrics": ["fid"], "ref_stats": str(tmp_path / "junk.npz")})



def test_ref_stats_members_are_read_as_np_load_reads_them(tmp_path):
    import zipfile

    # Members named without .npy (np.load accepts them) and extra arrays, as in guided-diffusion's files.
    p = tmp_path / "bare.npz"
    np.savez(p, mu=np.zeros(2048), sigma=np.zeros((2048, 2048), np.float32), arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(tmp_path / "renamed.npz", "w") as dst:
        for name in src.namelist():
            dst.writestr(name.removesuffix(".npy"), src.read(name))
    for path in (p, tmp_path / "renamed.npz"):
        assert resolve_spec({"metrics": ["fid"], "ref_stats": str(path)})["ref_stats"] == str(path)
        with np.load(path) as z:
            assert z["mu"].shape == (2048,)
    # A damaged compressed member is one error line, not a zlib traceback.
    q = tmp_path / "damaged.npz"
    np.savez_compressed(q, mu=np.arange(2048.0), sigma=np.ones((2048, 2048)))
    data = bytearray(q.read_bytes())
    data[60:400] = bytes(340)
    q.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="not an .npz with mu and sigma"):
        resolve_spec({"metrics": ["fid"], "ref_stats": str(q)})


def test_guidance_on_an_unconditional_model_is_refused_by_the_evaluator():
    from bench.core.diffusion import make_schedule
    from bench.eval.evaluate import Evaluator

    ev = Evaluator({"dataset": "synthetic", "metrics": ["proxy_fd"], "num_images": 4, "guidance_scale": 2.0})
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        ev.evaluate(Recorder(), make_schedule(), "eps", 1)


@pytest.mark.parametrize("cfg, what", [
    (dict(p_uncond=0.1), "set class_cond = true"),
    (dict(class_cond=True, p_uncond=1.0), "p_uncond"),
    (dict(eval={"guidance_scale": 2.0}), "guidance_scale needs a class-conditional run"),
    (dict(class_cond=True, eval={"guidance_scale": 2.0}), "p_uncond = 0 never trains"),
])
def test_bad_conditioning_settings_are_one_line(tmp_path, cfg, what):
    with pytest.raises(ConfigError, match=what):
        train(TrainConfig(dataset="synthetic", arch="unet-micro", iters=2, batch_size=4, **cfg), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_saved_samples_are_the_evaluated_images_in_guided_diffusions_format(tmp_path):
    from bench.eval.sampling import to_uint8

    spec = {"dataset": "synthetic", "metrics": ["proxy_fd"], "num_images": 6, "sampler_steps": 2, "batch_size": 6,
            "save_samples": True}
    cfg = TrainConfig(dataset="synthetic", arch="unet-micro", iters=2, batch_size=4, eval_every=2, eval=spec)
    train(cfg, tmp_path / "run")
    with np.load(tmp_path / "run" / "samples" / "step00000002.npz") as z:
        arr = z["arr_0"]
        assert z.files == ["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 16, 16, 1)
    # The same images as sampling the saved EMA again with the spec's fixed noise.
    from bench.core.diffusion import make_schedule
    from bench.models.networks import build_model

    ema = build_model("unet-micro", 1, 16).to(memory_format=torch.channels_last)
    ema.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["ema"])
    again = to_uint8(sample(ema, make_schedule(), "eps", 6, (1, 16, 16), batch_size=6, steps=2,
                            spacing="linspace"))
    assert np.array_equal(arr, again.permute(0, 2, 3, 1).numpy())


@needs_inception
def test_fid_against_external_reference_statistics(tmp_path):
    """ref_stats: FID against a published (mu, sigma), e.g. guided-diffusion's reference batch."""
    from bench.eval.evaluate import Evaluator
    from bench.eval.fid import feature_stats, frechet_distance
    from bench.eval.inception import get_inception

    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    mu, sigma = feature_stats(get_inception().features(images))
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, mu=mu, sigma=sigma, arr_0=np.zeros((6, 16, 16, 3), np.uint8))
    ev = Evaluator({"dataset": "synthetic", "metrics": ["fid"], "num_images": 4, "sampler_steps": 1,
                    "batch_size": 4, "ref_stats": str(ref), "cache_dir": str(tmp_path / "cache")})
    from bench.core.diffusion import make_schedule
    from bench.models.networks import build_model

    torch.manual_seed(0)
    model = build_model("unet-micro", 1, 16)
    rows = ev.evaluate(model, make_schedule(), "eps", 1)
    assert len(rows) == 1 and rows[0]["metric"] == "fid" and rows[0]["ref_stats"] == str(ref)
    assert rows[0]["noise_floor"] is None and rows[0]["num_ref"] == 6
    from bench.eval.sampling import to_uint8

    gen = to_uint8(sample(model, make_schedule(), "eps", 4, (1, 16, 16), batch_size=4, steps=1, spacing="linspace"))
    g_mu, g_sigma = feature_stats(get_inception().features(gen))
    assert rows[0]["value"] == pytest.approx(float(frechet_distance(g_mu, g_sigma, mu, sigma)), rel=1e-6)


@needs_inception
def test_legacy_tensorflow_mode_needs_clean_fids_own_file():
    from bench.eval.inception import InceptionExtractor, resolve_inception

    weights = resolve_inception(allow_download=False)
    if weights.layout == "clean-fid":
        pytest.skip("clean-fid's own file is here: legacy mode works")
    with pytest.raises(ConfigError, match="legacy_tensorflow needs clean-fid's inception-2015-12-05.pt"):
        InceptionExtractor(weights, mode="legacy_tensorflow")


def test_the_end_of_the_budget_can_be_evaluated_with_more_images(tmp_path):
    """final_num_images: e.g. FID-50k at the end beside the FID-10k curve, as another metric."""
    from bench import fileio

    spec = {"dataset": "synthetic", "metrics": ["proxy_fd"], "num_images": 4, "sampler_steps": 1, "batch_size": 8,
            "final_num_images": 8, "save_samples": True}
    train(TrainConfig(dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, eval_every=2, eval=spec),
          tmp_path / "run")
    rows = [(r["step"], r["metric"], r["num_gen"]) for r in fileio.read_jsonl(tmp_path / "run" / "evals.jsonl")]
    assert rows == [(2, "proxy_fd", 4), (4, "proxy_fd", 4), (4, "proxy_fd_final", 8)]
    # Every evaluation's samples are saved, the final set under its own name.
    saved = {p.name: np.load(p)["arr_0"].shape[0] for p in (tmp_path / "run" / "samples").iterdir()}
    assert saved == {"step00000002.npz": 4, "step00000004.npz": 4, "step00000004_final.npz": 8}


def test_a_class_conditional_run_learns_labels_drops_some_and_resumes_exactly(tmp_path):
    """class_cond: the labels reach the network's table (rows of seen classes move), label dropout
    sends some to the null row K, and the run resumes bit for bit (the drops are keyed by step)."""
    from bench import fileio

    base = dict(dataset="synthetic", arch="unet-micro", iters=6, batch_size=8, ckpt_every=3, warmup=0, lr=1e-2,
                class_cond=True, p_uncond=0.5, eval_every=6,
                eval={"dataset": "synthetic", "metrics": ["proxy_fd"], "num_images": 4, "sampler_steps": 1})
    train(TrainConfig(**base), tmp_path / "whole")

    train_until(TrainConfig(**base), tmp_path / "parts", 4)
    train(TrainConfig(**base), tmp_path / "parts")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert "rng" not in a  # every draw is keyed by (seed, step, sample): nothing to checkpoint
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    table = [k for k in a["model"] if "label" in k and k.endswith("weight")]
    assert table and a["model"][table[0]].shape[0] == 11  # 10 classes and the null label
    torch.manual_seed(0)
    from bench.models.networks import build_model

    init = build_model("unet-micro", 1, 16, num_classes=10).state_dict()[table[0]]
    moved = (a["model"][table[0]] - init).abs().sum(dim=1) > 0
    assert moved[10] and moved[:10].sum() >= 5  # the null row and the rows of seen classes trained
    rows = fileio.read_jsonl(tmp_path / "whole" / "evals.jsonl")
    assert rows[-1]["num_classes"] == 10 and rows[-1]["guidance_scale"] == 1.0


@pytest.mark.parametrize("net, settings", [
    ("adm", dict(net="adm", model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
                 num_heads=2, dropout=0.0)),
    ("dit", dict(net="dit", depth=2, hidden=64, heads=4, patch=4)),
])
def test_adm_and_dit_train_class_conditionally_through_the_harness_and_resume_exactly(tmp_path, monkeypatch, net,
                                                                                      settings):
    """ADM (421M parameters at ImageNet-128) is not CPU-sized: the same classes at a tiny width go the
    whole way through train() (labels, label dropout, guided evaluation, checkpoint and resume)."""
    from bench import fileio
    from bench.models import networks as models

    monkeypatch.setitem(models.ARCHS, f"{net}-test", (settings, f"a tiny {net} for this test"))
    base = dict(dataset="synthetic", arch=f"{net}-test", iters=4, batch_size=8, ckpt_every=2, warmup=0, lr=1e-3,
                class_cond=True, p_uncond=0.2, eval_every=4,
                eval={"dataset": "synthetic", "metrics": ["proxy_fd"], "num_images": 4, "sampler_steps": 2,
                      "guidance_scale": 2.0})
    train(TrainConfig(**base), tmp_path / "whole")
    train_until(TrainConfig(**base), tmp_path / "parts", 3)
    train(TrainConfig(**base), tmp_path / "parts")

    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    steps = fileio.read_jsonl(tmp_path / "whole" / "steps.jsonl")
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
    assert [r["loss"] for r in fileio.read_jsonl(tmp_path / "parts" / "steps.jsonl")] == [r["loss"] for r in steps]
    row = fileio.read_jsonl(tmp_path / "whole" / "evals.jsonl")[-1]
    assert row["num_classes"] == 10 and row["guidance_scale"] == 2.0 and np.isfinite(row["value"])
