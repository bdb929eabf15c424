"""The proxy classifier: accuracy on Fashion-MNIST, determinism, its cache, and its distances."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion

from bench import proxy as P
from bench.data import load_dataset
from bench.fid import feature_stats, frechet_distance, kernel_distance


def _shared_cache() -> Path:
    # Kept between test runs (conftest points DIFFBENCH_CACHE into .pytest_cache), so the
    # Fashion-MNIST classifiers are trained once (about 1 minute each on 2 CPU cores).
    return Path(os.environ["DIFFBENCH_CACHE"]) / "eval"


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("resolution", [28, 16])
def test_fashion_mnist_accuracy_at_least_90_percent(resolution):
    ext = P.get_proxy("fashion-mnist", resolution, cache_dir=_shared_cache())
    test_x, test_y = load_dataset("fashion-mnist", "test", resolution=resolution)
    acc = P.accuracy(ext.model, test_x, test_y)  # measured again, not read from the record
    assert acc >= 0.90, acc
    assert abs(acc - ext.info["test_accuracy"]) < 1e-9
    assert ext.name == f"fmnist-cnn-v1-r{resolution}" and ext.resolution == resolution
    assert ext.info["train_seconds"] < 600


@pytest.mark.slow
@needs_fashion
def test_proxy_fd_separates_real_from_degraded_images():
    ext = P.get_proxy("fashion-mnist", 28, cache_dir=_shared_cache())
    test_x, _ = load_dataset("fashion-mnist", "test", resolution=28)
    train_x, _ = load_dataset("fashion-mnist", "train", resolution=28)
    ref = ext.features(train_x[:2000])
    real = ext.features(test_x[:1000])
    blurred = torch.nn.functional.avg_pool2d(test_x[:1000].float(), 3, 1, 1).round().to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1000, 1, 28, 28), generator=g, dtype=torch.uint8)
    mu_r, s_r = feature_stats(ref)
    fd = {name: frechet_distance(*feature_stats(f), mu_r, s_r)
          for name, f in (("real", real), ("blurred", ext.features(blurred)), ("noise", ext.features(noise)))}
    assert fd["real"] < fd["blurred"] / 3 < fd["noise"] / 3, fd
    assert kernel_distance(real, ref) < kernel_distance(ext.features(blurred), ref)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    x, y = load_dataset("synthetic", "train")
    state = torch.get_rng_state()
    m1 = P.train_proxy(x, y, seed=0, epochs=2)
    assert torch.equal(torch.get_rng_state(), state)
    m2 = P.train_proxy(x, y, seed=0, epochs=2)
    m3 = P.train_proxy(x, y, seed=1, epochs=2)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_cache_is_keyed_by_resolution_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_LOADED", {})
    e16 = P.get_proxy("synthetic", cache_dir=tmp_path)  # the dataset's own 16 px
    e8 = P.get_proxy("synthetic", 8, cache_dir=tmp_path)
    assert (e16.resolution, e8.resolution) == (16, 8) and e16.name != e8.name
    files = sorted(p.name for p in (tmp_path / "proxy").iterdir())
    assert files == ["synthetic-cnn-v1-r16-seed0.json", "synthetic-cnn-v1-r16-seed0.pt",
                     "synthetic-cnn-v1-r8-seed0.json", "synthetic-cnn-v1-r8-seed0.pt"]
    info = json.loads((tmp_path / "proxy" / "synthetic-cnn-v1-r16-seed0.json").read_text())
    assert info["weights_sha1"] == e16.weights_sha1 and 0 <= info["test_accuracy"] <= 1

    # From disk in a "new process": same weights, same features.
    x, _ = load_dataset("synthetic", "test")
    feats = e16.features(x[:50])
    assert feats.shape == (50, P.FEATURE_DIM) and (feats >= 0).all()
    monkeypatch.setattr(P, "_LOADED", {})
    again = P.get_proxy("synthetic", cache_dir=tmp_path)
    assert again is not e16 and again.weights_sha1 == e16.weights_sha1
    assert np.array_equal(again.features(x[:50]), feats)

    # A damaged weight file does not match its record: retrained (deterministically) and rewritten.
    pt = tmp_path / "proxy" / "synthetic-cnn-v1-r16-seed0.pt"
    pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(P, "_LOADED", {})
    fixed = P.get_proxy("synthetic", cache_dir=tmp_path)
    assert fixed.weights_sha1 == e16.weights_sha1
    assert np.array_equal(fixed.features(x[:50]), feats)

    # Features are scaled so that mean ||f||^2 / d over the training images is 1 (KID's kernel
    # regime); a record written without the scale gets it added, with the same value.
    train_x, _ = load_dataset("synthetic", "train")
    f = fixed.features(train_x)
    assert abs(float((f.astype(np.float64) ** 2).sum(1).mean()) / f.shape[1] - 1) < 1e-4
    js = tmp_path / "proxy" / "synthetic-cnn-v1-r16-seed0.json"
    rec = json.loads(js.read_text())
    scale = rec.pop("feature_scale")
    js.write_text(json.dumps(rec))
    monkeypatch.setattr(P, "_LOADED", {})
    old = P.get_proxy("synthetic", cache_dir=tmp_path)
    assert abs(old.scale - scale) < 1e-9 and json.loads(js.read_text())["feature_scale"] == old.scale
    assert str(round(scale, 6))[:6] in old.preprocess  # part of the reference-statistics key

    with pytest.raises(ValueError, match="takes"):
        e16.features(x[:5, :, :8, :8])
    with pytest.raises(ValueError, match="uint8"):
        e16.features(x[:5].float())
