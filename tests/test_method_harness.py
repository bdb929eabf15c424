"""The extended plugin contract in training: every registered method resumes bit for bit after a
kill (its state and extra module included), REPA's extra module joins the optimizer, the checkpoint
and the gradient, the power EMA's snapshots reconstruct its averages, and describe shows p(t) w(t)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, train_until

from bench import fileio
from bench.core.registry import get_method, load_plugins
from bench.train.loop import TrainConfig, setup, train

SMALL = dict(dataset="synthetic", arch="unet-tiny", iters=12, batch_size=8, ckpt_every=4, warmup=3)
# loss_aware warms up (every t seen `history` times) within 12 steps only on a short schedule.
VARIANTS = {"loss_aware": ({"history": 2}, {"T": 16, "schedule": "cosine"}), "power_ema": ({"snapshot_every": 4}, {}),
            "repa": ({"proj_dim": 32}, {})}


def case(name):
    params, cfg = VARIANTS.get(name, ({}, {}))
    return TrainConfig(method=name, method_params=params, **{**SMALL, **cfg})


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def assert_equal(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "train_seconds", "data_seconds")} for r in rows]


@pytest.mark.parametrize("name", sorted(load_plugins()))
def test_every_method_resumes_bit_for_bit(tmp_path, name):
    """Killed after step 7 (checkpoint at 4), run again: weights, EMA, optimizer, the method's state, its
    extra module, the logs and the snapshots equal an uninterrupted run's."""
    # unet-micro: exactness across a resume is the harness's and the method's, not the network's size
    cfg = dataclasses.replace(case(name), arch="unet-micro")
    train(cfg, tmp_path / "whole")
    train_until(cfg, tmp_path / "parts", 7)
    assert fileio.read_json(tmp_path / "parts" / "status.json")["step"] == 4
    assert train(cfg, tmp_path / "parts")["state"] == "done"
    whole, parts = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "parts")
    for key in ("model", "ema", "opt", "method_state", "aux"):
        assert (key in whole) == (key in parts), key
        if key in whole:
            assert_equal(whole[key], parts[key], key)
    assert strip_timing(fileio.read_jsonl(tmp_path / "whole" / "steps.jsonl")) == \
        strip_timing(fileio.read_jsonl(tmp_path / "parts" / "steps.jsonl"))
    assert fileio.read_json(tmp_path / "whole" / "method_trace.json") == \
        fileio.read_json(tmp_path / "parts" / "method_trace.json")  # the cold start's, however the run went
    snaps = sorted(p.name for p in (tmp_path / "whole").glob("ema_snapshots/*.pt"))
    assert snaps == sorted(p.name for p in (tmp_path / "parts").glob("ema_snapshots/*.pt"))
    for s in snaps:
        assert_equal(torch.load(tmp_path / "whole" / "ema_snapshots" / s, weights_only=True),
                     torch.load(tmp_path / "parts" / "ema_snapshots" / s, weights_only=True), s)
    if name == "loss_aware":  # its state was warm (no longer uniform) before the kill was resumed
        state = whole["method_state"]
        assert bool((state["counts"] == 2).all()) and state["losses"].shape == (16, 2)
    if name == "power_ema":
        assert snaps == ["00000004.pt", "00000008.pt", "00000012.pt"]


def test_repa_module_joins_the_optimizer_the_checkpoint_and_the_gradient(tmp_path):
    method = get_method("repa", {"proj_dim": 32})
    state = setup(TrainConfig(method="repa", method_params={"proj_dim": 32}, **SMALL), method)
    proj = list(state.aux.module.proj.parameters())
    in_opt = {id(p) for g in state.opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in proj) and all(id(p) in in_opt for p in state.model.parameters())
    assert not any(id(p) in in_opt for p in state.aux.module.teacher.parameters())  # frozen
    assert not any(p.requires_grad for p in state.aux.module.teacher.parameters())
    # The alignment loss alone: its gradient reaches the network's layers up to the aligned one, not after.
    x0 = torch.rand(4, *state.images.shape[1:]) * 2 - 1
    t = torch.tensor([10, 200, 500, 900])
    _, extra = state.net(x0, t, None, x0)
    assert extra.shape == (4,)
    extra.sum().backward()
    assert state.model.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj)
    assert state.model.conv_out.weight.grad is None or state.model.conv_out.weight.grad.abs().sum() == 0
    # Through training: the projector is saved, and it moved from its initial weights.
    cfg = TrainConfig(method="repa", method_params={"proj_dim": 32}, **{**SMALL, "iters": 4})
    train(cfg, tmp_path / "run")
    saved = checkpoint(tmp_path / "run")["aux"]
    assert {k.split(".")[0] for k in saved} == {"proj", "teacher"}
    assert not torch.equal(saved["proj.0.weight"], state.aux.module.proj[0].weight.detach())


@pytest.mark.parametrize("layer, why", [("nope", "no layer 'nope'"), ("mid", "'mid' is never called"),
                                        ("temb", "'temb' outputs (1, 128)")])
def test_a_bad_repa_layer_is_one_line_and_leaves_nothing(tmp_path, capsys, layer, why):
    from bench.cli import main

    run = tmp_path / "r"
    rc = main(["train", "--method", "repa", "--set", f"layer={layer}", "--dataset", "synthetic", "--arch", "unet-tiny",
               "--iters", "2", "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and why in err, err
    assert not run.exists()  # no folder, so no config.json left to refuse the corrected run
    fixed = TrainConfig(method="repa", method_params={"layer": "mid.0", "proj_dim": 8}, **{**SMALL, "iters": 2})
    assert train(fixed, run)["state"] == "done"


def test_a_combination_without_a_timesteps_part_draws_uniform_t(tmp_path):
    """combined = p2 + lr_control fills weighting and optimizer: t stays the baseline's draw."""
    cfg = TrainConfig(method="combined", method_params={"parts": "p2+lr_control"}, **{**SMALL, "iters": 3})
    assert train(cfg, tmp_path / "c")["state"] == "done"
    base = TrainConfig(method="p2", **{**SMALL, "iters": 3})
    train(base, tmp_path / "p2")
    first = [fileio.read_jsonl(tmp_path / d / "steps.jsonl")[0] for d in ("c", "p2")]
    assert first[0]["loss"] == first[1]["loss"]  # step 1: same t, weights and lr (lr_control's factor is 1 at p = 0)


def test_power_ema_snapshots_reconstruct_the_evaluated_average(tmp_path, capsys):
    """The evaluated EMA (sigma_rel 0.10) equals the post-hoc reconstruction at 0.10 from the snapshots of
    the tracked 0.05 and 0.10 averages, to float tolerance."""
    from bench.cli import main

    power_ema = sys.modules[type(get_method("power_ema")).__module__]
    cfg = TrainConfig(method="power_ema", method_params={"snapshot_every": 4}, **SMALL)
    train(cfg, tmp_path)
    ema = checkpoint(tmp_path)["ema"]
    rebuilt = power_ema.reconstruct(tmp_path, 0.10, 12)
    for k, v in rebuilt.items():
        torch.testing.assert_close(v, ema[k], rtol=1e-5, atol=1e-6)
    # The command writes a loadable EMA of another width at a saved step, and never overwrites it
    # (its first call as its own process, as a user runs it; the others in this one).
    cli = ["posthoc-ema", str(tmp_path), "--sigma-rel", "0.07", "--step", "8"]
    out = subprocess.run([sys.executable, "run_bench.py", *cli], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    written = tmp_path / "ema_posthoc" / "sigma0.07-step00000008.pt"
    assert out.stdout.strip() == str(written) and written.stat().st_size > 0
    state = torch.load(written, weights_only=True)
    assert state.keys() == ema.keys()
    torch.testing.assert_close(state["conv_in.weight"], power_ema.reconstruct(tmp_path, 0.07, 8)["conv_in.weight"])
    mtime = written.stat().st_mtime_ns
    assert main(cli) == 0 and capsys.readouterr().out.strip() == str(written)
    assert written.stat().st_mtime_ns == mtime
    assert main(cli[:-1] + ["10"]) == 2
    err = capsys.readouterr().err
    assert "step 10 has no snapshot" in err and err.count("\n") == 1
    rows = fileio.read_jsonl(tmp_path / "steps.jsonl")
    gamma = power_ema.sigma_rel_to_gamma(0.10)
    assert [r["ema_decay"] for r in rows] == pytest.approx([(1 - 1 / s) ** (gamma + 1) for s in range(1, 13)])


def test_describe_shows_the_importance_density_of_every_method():
    out = subprocess.run([sys.executable, "run_bench.py", "describe", "all", "--json"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert set(rows) == set(load_plugins()) - {"combined"}
    for name, d in rows.items():
        imp = torch.tensor(d["importance"], dtype=torch.float64)
        expected = torch.tensor(d["timestep_probs"], dtype=torch.float64) * torch.tensor(d["loss_weights"],
                                                                                          dtype=torch.float64)
        torch.testing.assert_close(imp, expected / expected.sum())
        if d["weight_scale"] == "normalised":  # mean 1 under the method's own sampling
            assert float(expected.sum()) == pytest.approx(1.0, rel=1e-12), name
    assert rows["p2"]["weight_scale"] == "source" and rows["edm"]["weight_scale"] == "normalised"
    text = subprocess.run([sys.executable, "run_bench.py", "describe", "all"], cwd=REPO, capture_output=True,
                          text=True)
    assert text.returncode == 0 and "p2 (source)" in text.stdout and "speed" in text.stdout
