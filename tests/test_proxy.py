"""The proxy classifier: shipped pinned weights, accuracy on Fashion-MNIST, determinism, its cache,
and its distances."""

import ast
import fnmatch
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion

from bench.data.loading import load_dataset
from bench.errors import ConfigError
from bench.eval import proxy as P
from bench.eval.fid import feature_stats, frechet_distance, kernel_distance

REPO = Path(__file__).resolve().parent.parent


def _forbid_training_and_data(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a shipped extractor must load without training or loading the dataset")

    monkeypatch.setattr(P, "train_proxy", boom)
    monkeypatch.setattr(P, "load_dataset", boom)  # the name bench.eval.proxy calls


@pytest.fixture
def fresh(monkeypatch):
    """No extractor in memory: every get_proxy call goes to disk."""
    monkeypatch.setattr(P, "_LOADED", {})


def test_shipped_files_match_the_pinned_table():
    expected = set()
    for (dataset, res, seed), sha in P.SHIPPED.items():
        pt, js = P.shipped_paths(dataset, res, seed)
        data = pt.read_bytes()
        assert len(sha) == 64 and hashlib.sha256(data).hexdigest() == sha, pt.name
        info = json.loads(js.read_text())
        assert info["weights_sha256"] == sha and info["weights_sha1"] == hashlib.sha1(data).hexdigest()
        assert (info["name"], info["dataset"], info["resolution"], info["seed"]) == (P.proxy_name(dataset, res),
                                                                                    dataset, res, seed)
        assert info["version"] == P.PROXY_VERSION and info["feature_scale"] > 0
        expected |= {pt.name, js.name}
    assert {("fashion-mnist", 16, 0), ("fashion-mnist", 28, 0), ("synthetic", 16, 0)} <= set(P.SHIPPED)
    assert {p.name for p in P.WEIGHTS_DIR.iterdir()} == expected  # no stray or unpinned files


def test_package_data_includes_the_shipped_files():
    # Read by hand: tomllib is not in Python 3.10, which the project supports.
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    # The weights live in the bench.eval package (bench/eval/proxy_weights/): its package-data entry.
    patterns = ast.literal_eval(re.search(r'^"bench\.eval"\s*=\s*(\[.*?\])', section.group(1), re.M | re.S).group(1))
    for p in P.WEIGHTS_DIR.iterdir():
        rel = p.relative_to(REPO / "bench" / "eval").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel


def test_shipped_extractor_loads_without_training_or_data(tmp_path, monkeypatch, fresh):
    _forbid_training_and_data(monkeypatch)
    state = torch.get_rng_state()
    ext = P.get_proxy("fashion-mnist", 16, cache_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), state)  # loading mid-training leaves its RNG alone
    assert ext.shipped and ext.weights_sha256 == P.SHIPPED[("fashion-mnist", 16, 0)]
    assert ext.name == "fmnist-cnn-v1-r16" and ext.resolution == 16 and ext.in_ch == 1
    assert "shipped" in ext.source and ext.weights_sha256[:12] in ext.source
    assert ext.weights_sha1 == ext.info["weights_sha1"]
    assert not (tmp_path / "proxy").exists()  # nothing trained or cached
    assert P.get_proxy("fashion-mnist", 16, cache_dir=tmp_path / "other") is ext  # from memory
    syn = P.get_proxy("synthetic", cache_dir=tmp_path)  # resolution None: the dataset's own 16 px
    assert syn.shipped and syn.resolution == 16 and syn.weights_sha256 == P.SHIPPED[("synthetic", 16, 0)]
    feats = syn.features(torch.zeros(3, 1, 16, 16, dtype=torch.uint8))
    assert feats.shape == (3, P.FEATURE_DIM)


def test_damaged_shipped_weights_are_a_one_line_error(tmp_path, monkeypatch, fresh):
    folder = tmp_path / "proxy_weights"
    shutil.copytree(P.WEIGHTS_DIR, folder)
    monkeypatch.setattr(P, "WEIGHTS_DIR", folder)
    _forbid_training_and_data(monkeypatch)
    pt = folder / "fmnist-cnn-v1-r16-seed0.pt"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0x01
    pt.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"^shipped proxy weights {re.escape(str(pt))} have SHA-256 [0-9a-f]+"
                                          r"\.\.\., not the pinned .*restore it with `git checkout "
                                          r"bench/eval/proxy_weights`$") as err:
        P.get_proxy("fashion-mnist", 16, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and str(pt) in msg and "git checkout bench/eval/proxy_weights" in msg and "SHA-256" in msg
    assert pt.read_bytes() == bytes(data)  # left as it was, not retrained over

    (folder / "synthetic-cnn-v1-r16-seed0.pt").unlink()
    with pytest.raises(ConfigError, match="missing.*git checkout bench/eval/proxy_weights"):
        P.get_proxy("synthetic", cache_dir=tmp_path / "cache")
    js = folder / "fmnist-cnn-v1-r28-seed0.json"
    js.write_text(js.read_text().replace('"resolution": 28', '"resolution": 27'))
    with pytest.raises(ConfigError, match="resolution.*git checkout bench/eval/proxy_weights"):
        P.get_proxy("fashion-mnist", 28, cache_dir=tmp_path / "cache")
    # The feature scale multiplies every feature: an edited one is refused too.
    js = folder / "fmnist-cnn-v1-r12-seed0.json"
    rec = json.loads(js.read_text())
    js.write_text(json.dumps({**rec, "feature_scale": rec["feature_scale"] * 2}))
    with pytest.raises(ConfigError, match="feature_scale.*git checkout bench/eval/proxy_weights"):
        P.get_proxy("fashion-mnist", 12, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_every_shipped_suite_uses_a_shipped_extractor():
    """One metric on every machine: no shipped suite's proxy metric depends on training here."""
    from bench.data.loading import dataset_info
    from bench.suite.grid import available_suites, load_suite

    for name in available_suites():
        suite = load_suite(name)
        if not {"proxy_fd", "proxy_kid"} & set(suite.eval["metrics"]):
            continue
        for w in suite.workloads:
            res = w.resolution or dataset_info(w.dataset).RESOLUTION
            key = (w.dataset, res, suite.eval.get("proxy_seed", 0))
            assert key in P.SHIPPED and key in P.SHIPPED_SCALES, (name, key)


def test_retrain_never_touches_shipped_files(tmp_path, monkeypatch, fresh):
    folder = tmp_path / "proxy_weights"
    shutil.copytree(P.WEIGHTS_DIR, folder)
    monkeypatch.setattr(P, "WEIGHTS_DIR", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    trained = P.get_proxy("synthetic", cache_dir=tmp_path / "cache", retrain=True)
    assert not trained.shipped and "trained here" in trained.source
    assert (tmp_path / "cache" / "proxy" / "synthetic-cnn-v1-r16-seed0.pt").is_file()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert P.get_proxy("synthetic", cache_dir=tmp_path / "cache").shipped  # the shipped one wins again
    with pytest.raises(ConfigError, match="never overwritten"):
        P.get_proxy("synthetic", cache_dir=folder, retrain=True)


def test_shipped_synthetic_feature_scale_matches_its_weights():
    ext = P.load_shipped("synthetic", 16)
    x, _ = load_dataset("synthetic", "train")
    assert abs(P.feature_scale(ext.model, x) / ext.scale - 1) < 1e-5


@pytest.mark.slow
@needs_fashion
def test_fashion_mnist_shipped_accuracy_at_least_90_percent():
    for res in (12, 16, 28):
        info = P.load_shipped("fashion-mnist", res).info
        assert info["test_accuracy"] >= 0.90 and info["train_images"] == 60000, (res, info["test_accuracy"])
    ext = P.load_shipped("fashion-mnist", 16)
    test_x, test_y = load_dataset("fashion-mnist", "test", resolution=16)
    acc = P.accuracy(ext.model, test_x, test_y)  # measured again, not read from the record
    assert acc >= 0.90, acc
    assert abs(acc - ext.info["test_accuracy"]) < 2e-3  # a few near-ties may flip on another CPU


@pytest.mark.slow
@needs_fashion
def test_proxy_fd_separates_real_from_degraded_images():
    ext = P.load_shipped("fashion-mnist", 28)
    test_x, _ = load_dataset("fashion-mnist", "test", resolution=28)
    train_x, _ = load_dataset("fashion-mnist", "train", resolution=28)
    ref = ext.features(train_x[:2000])
    # The shipped record's feature scale belongs to these weights: mean ||f||^2 / d is 1.
    assert abs(float((ref.astype(np.float64) ** 2).sum(1).mean()) / ref.shape[1] - 1) < 0.05
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


def test_unshipped_resolutions_are_trained_cached_and_checked(tmp_path, monkeypatch, fresh):
    assert ("synthetic", 12, 0) not in P.SHIPPED and ("synthetic", 8, 0) not in P.SHIPPED
    e12 = P.get_proxy("synthetic", 12, cache_dir=tmp_path)
    e8 = P.get_proxy("synthetic", 8, cache_dir=tmp_path)
    assert (e12.resolution, e8.resolution) == (12, 8) and e12.name != e8.name
    assert not e12.shipped and "trained here" in e12.source and e12.weights_sha256[:12] in e12.source
    files = sorted(p.name for p in (tmp_path / "proxy").iterdir())
    assert files == ["synthetic-cnn-v1-r12-seed0.json", "synthetic-cnn-v1-r12-seed0.pt",
                     "synthetic-cnn-v1-r8-seed0.json", "synthetic-cnn-v1-r8-seed0.pt"]
    pt = tmp_path / "proxy" / "synthetic-cnn-v1-r12-seed0.pt"
    js = tmp_path / "proxy" / "synthetic-cnn-v1-r12-seed0.json"
    info = json.loads(js.read_text())
    assert info["weights_sha1"] == e12.weights_sha1 and 0 <= info["test_accuracy"] <= 1
    assert info["weights_sha256"] == e12.weights_sha256 == hashlib.sha256(pt.read_bytes()).hexdigest()

    # From disk in a "new process": same weights, same features.
    x, _ = load_dataset("synthetic", "test", resolution=12)
    feats = e12.features(x[:50])
    assert feats.shape == (50, P.FEATURE_DIM) and (feats >= 0).all()
    monkeypatch.setattr(P, "_LOADED", {})  # part of the check: get_proxy must read the disk again
    again = P.get_proxy("synthetic", 12, cache_dir=tmp_path)
    assert again is not e12 and again.weights_sha256 == e12.weights_sha256 and not again.shipped
    assert np.array_equal(again.features(x[:50]), feats)

    # A damaged cached weight file does not match its record: retrained (deterministically, on
    # this machine) and rewritten. Only trained-here weights are ever retrained.
    pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(P, "_LOADED", {})  # read the damaged file from disk
    fixed = P.get_proxy("synthetic", 12, cache_dir=tmp_path)
    assert fixed.weights_sha256 == e12.weights_sha256
    assert np.array_equal(fixed.features(x[:50]), feats)

    # Features are scaled so that mean ||f||^2 / d over the training images is 1 (KID's kernel
    # regime); a record written without the scale or the SHA-256 (an older version) gets them
    # added, with the same values.
    train_x, _ = load_dataset("synthetic", "train", resolution=12)
    f = fixed.features(train_x)
    assert abs(float((f.astype(np.float64) ** 2).sum(1).mean()) / f.shape[1] - 1) < 1e-4
    rec = json.loads(js.read_text())
    scale = rec.pop("feature_scale")
    sha256 = rec.pop("weights_sha256")
    js.write_text(json.dumps(rec))
    monkeypatch.setattr(P, "_LOADED", {})  # read the old record from disk
    old = P.get_proxy("synthetic", 12, cache_dir=tmp_path)
    assert abs(old.scale - scale) < 1e-9 and json.loads(js.read_text())["feature_scale"] == old.scale
    assert old.weights_sha256 == sha256 == json.loads(js.read_text())["weights_sha256"]
    assert str(round(scale, 6))[:6] in old.preprocess  # part of the reference-statistics key

    with pytest.raises(ValueError, match="takes"):
        e12.features(x[:5, :, :8, :8])
    with pytest.raises(ValueError, match="uint8"):
        e12.features(x[:5].float())
