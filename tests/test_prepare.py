"""bench/data/prepare.py: sources, the ADM centre crop, skipped files, resume, refusals, verification, loaders.

Small on purpose: a dozen 40x30 JPEGs written at 16 px (the loader test writes 128 px)."""

import argparse
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import prepare as P
from bench.errors import BenchError, ConfigError, DatasetError

WNIDS = ("n01440764", "n01443537", "n02099601")
R = 16


def photo(seed: int, size=(40, 30)) -> Image.Image:
    """A small image with structure (so resampling and crop offsets matter), not flat noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 64 * 4], axis=-1)
    noise = rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_tree(root, per_class=4, seed=0):
    """ILSVRC-style tree root/nXXXXXXXX/nXXXXXXXX_k.JPEG; returns [(wnid, file name, bytes)] in sorted order."""
    out = []
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            name = f"{wnid}_{k}.JPEG"
            photo(seed + 10 * c + k).save(root / wnid / name, quality=90)
            out.append((wnid, name, (root / wnid / name).read_bytes()))
    return sorted(out)


def arrays(out):
    return np.load(out / "images.npy"), np.load(out / "labels.npy")


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------------------------
# The transform


def adm_crop_reference(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop written another way: every size worked out first in exact arithmetic,
    then applied, and the crop done by PIL rather than by array slicing."""
    w, h = img.size
    halvings = []
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        halvings.append((w, h))
    short = min(w, h)
    final = (round(Fraction(w * size, short)), round(Fraction(h * size, short)))
    for s in halvings:
        img = img.resize(s, Image.Resampling.BOX)
    img = img.resize(final, Image.Resampling.BICUBIC)
    left, top = (final[0] - size) // 2, (final[1] - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (300, 200), (16, 16), (17, 50), (8, 6), (129, 64)])
def test_center_crop_matches_an_independent_computation(size):
    img = photo(1, size)
    got = P.center_crop_arr(img, R)
    assert got.shape == (R, R, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, adm_crop_reference(img, R))


def test_center_crop_colour_and_modes():
    # a solid image keeps its colour exactly, whatever the resampling
    solid = P.center_crop_arr(Image.new("RGB", (70, 45), (200, 30, 90)), R)
    assert (solid.reshape(-1, 3) == (200, 30, 90)).all()
    # a centre block wider than the crop covers it entirely; the borders, cropped away, never show
    img = Image.new("RGB", (96, 32), (0, 0, 255))
    img.paste((255, 0, 0), (24, 0, 72, 32))  # 48 px wide centre block -> 24 px after halving, crop is 16
    assert (P.center_crop_arr(img, R).reshape(-1, 3) == (255, 0, 0)).all()
    # grey, RGBA and CMYK all become RGB first, as ADM converts before cropping
    grey = P.decode_task([np.full((30, 40), 77, np.uint8)], R)[0]
    assert grey.shape == (1, 3, R, R) and (grey == 77).all()
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 150, 0  # fully transparent green: alpha is dropped, not composited
    assert (P.decode_task([rgba], R)[0][:, 1] == 150).all()
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)
    cmyk = P.decode_task([buf.getvalue()], R)[0]
    assert cmyk.shape == (1, 3, R, R) and cmyk[0, 0].mean() > 200 and cmyk[0, 1:].mean() < 60


# --------------------------------------------------------------------------------------------
# ImageNet sources


def write_parquet(paths, rows, row_group_size=3):
    """HF imagenet-1k layout: image = struct<bytes, path>, label = int64; rows split over the shards."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per = -(-len(rows) // len(paths))
    for i, path in enumerate(paths):
        part = rows[i * per:(i + 1) * per]
        table = pa.table({"image": pa.array([{"bytes": b, "path": n} for n, b, _ in part], type=image_type),
                          "label": pa.array([lab for _, _, lab in part], type=pa.int64())})
        pq.write_table(table, path, row_group_size=row_group_size)


def test_imagenet_layouts_and_parquet_give_the_same_arrays(tmp_path):
    files = make_tree(tmp_path / "tree")
    (tmp_path / "nested").mkdir()
    shutil.copytree(tmp_path / "tree", tmp_path / "nested" / "train")
    (tmp_path / "flat").mkdir()
    for wnid, name, data in files:
        (tmp_path / "flat" / name).write_bytes(data)
    (tmp_path / "hf" / "data").mkdir(parents=True)
    rows = [(name, data, WNIDS.index(wnid)) for wnid, name, data in files]
    write_parquet([tmp_path / "hf" / "data" / f"train-0000{i}-of-00002.parquet" for i in range(2)], rows)
    write_parquet([tmp_path / "hf" / "data" / "validation-00000-of-00001.parquet"], rows[:2])  # must be ignored

    runs = {"tree": ("tree", 1), "nested": ("nested", 2), "flat": ("flat", 1), "hf": ("hf", 1),
            "glob": (str(tmp_path / "hf" / "data" / "train-*.parquet"), 2)}
    outs = {}
    for key, (src, workers) in runs.items():
        src = src if "*" in src else str(tmp_path / src)
        outs[key] = P.prepare("imagenet128", src, tmp_path / "out" / key, R, workers=workers, progress=False,
                              chunk_size=5)
    ref_images, ref_labels = arrays(outs["tree"])
    assert ref_images.shape == (12, 3, R, R) and ref_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    expected = np.stack([P.center_crop_arr(Image.open(tmp_path / "tree" / w / n).convert("RGB"), R)
                         for w, n, _ in files]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ref_images, expected)
    for key, out in outs.items():
        images, labels = arrays(out)
        np.testing.assert_array_equal(images, ref_images, err_msg=key)
        np.testing.assert_array_equal(labels, ref_labels, err_msg=key)
    kinds = {key: manifest(out)["source"]["kind"] for key, out in outs.items()}
    assert kinds == {"tree": "ilsvrc-tree", "nested": "ilsvrc-tree", "flat": "ilsvrc-flat", "hf": "hf-parquet",
                     "glob": "hf-parquet"}
    assert manifest(outs["tree"])["label_map"] == {w: i for i, w in enumerate(WNIDS)}
    assert manifest(outs["flat"])["label_map"] == manifest(outs["tree"])["label_map"]
    assert manifest(outs["hf"])["label_map"] == "from the parquet label column"
    assert manifest(outs["tree"])["sha256"] == manifest(outs["nested"])["sha256"]


def test_corrupt_files_are_skipped_and_named(tmp_path):
    make_tree(tmp_path / "src", per_class=3)
    good = tmp_path / "src" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG"
    (tmp_path / "src" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG").write_bytes(good.read_bytes()[:300])  # truncated
    (tmp_path / "src" / WNIDS[2] / f"{WNIDS[2]}_9.JPEG").write_bytes(b"not a jpeg at all")
    out = P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "out", R, workers=2, progress=False,
                    chunk_size=4)
    m = manifest(out)
    assert m["counts"] == {"found": 10, "written": 8, "skipped": 2}
    assert [s["file"] for s in m["skipped"]] == [f"{WNIDS[0]}/{WNIDS[0]}_1.JPEG", f"{WNIDS[2]}/{WNIDS[2]}_9.JPEG"]
    assert all(s["reason"] for s in m["skipped"])
    images, labels = arrays(out)
    assert images.shape == (8, 3, R, R) and labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    # the rows after a skipped file moved up: row 1 is the class-0 image _2
    img = Image.open(tmp_path / "src" / WNIDS[0] / f"{WNIDS[0]}_2.JPEG").convert("RGB")
    np.testing.assert_array_equal(images[1], P.center_crop_arr(img, R).transpose(2, 0, 1))
    P.verify_prepared(out, check_hash=True)


def test_no_images_or_missing_source_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    empty, absent = re.escape(str(tmp_path / "empty")), re.escape(str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match=rf"^no ImageNet images in {empty}: expected ") as exc:
        P.prepare("imagenet128", str(tmp_path / "empty"), out, R, workers=1, progress=False)
    assert str(tmp_path / "empty") in one_line(exc)
    with pytest.raises(DatasetError, match=rf"^{absent} does not exist; pass the ILSVRC2012 ") as exc:
        P.prepare("imagenet128", str(tmp_path / "absent"), out, R, workers=1, progress=False)
    assert "absent" in one_line(exc)
    with pytest.raises(DatasetError, match=rf"^no images in {empty} .*point folder:PATH at ") as exc:
        P.prepare("folder", str(tmp_path / "empty"), out, R, workers=1, progress=False)
    assert "no images" in one_line(exc)
    with pytest.raises(DatasetError, match=r"^imagenet128 needs SRC: the ILSVRC2012 train folder"):
        P.prepare("imagenet128", None, out, R, workers=1, progress=False)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    # a partial folder left by a start that failed before any work (no plan.json) does not block
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "images.npy").write_bytes(b"half")
    make_tree(tmp_path / "src", per_class=1)
    P.prepare("imagenet128", str(tmp_path / "src"), out, R, workers=1, progress=False)
    assert manifest(out)["counts"]["written"] == 3 and not (tmp_path / "out.partial").exists()


class Killed(Exception):
    pass


def test_resume_after_interruption_matches_a_clean_run(tmp_path, monkeypatch):
    make_tree(tmp_path / "src")
    (tmp_path / "src" / WNIDS[1] / f"{WNIDS[1]}_2.JPEG").write_bytes(b"broken")  # a skip before the kill
    clean = P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "clean", R, workers=1, progress=False,
                      chunk_size=4)

    done = []

    def kill_after_first(split, chunk):
        done.append(chunk)
        if len(done) == 2:
            raise Killed("killed after the second chunk")

    monkeypatch.setattr(P, "_after_chunk", kill_after_first)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    with pytest.raises(Killed, match="^killed after the second chunk$"):
        P.prepare("imagenet128", str(tmp_path / "src"), out, R, workers=2, progress=False, chunk_size=4)
    assert not out.exists() and partial.is_dir()
    assert json.loads((partial / "progress-train.json").read_text())["chunks_done"] == 2
    assert len((partial / "items-train.txt").read_text().splitlines()) == 12

    done.clear()
    monkeypatch.setattr(P, "_after_chunk", lambda split, chunk: done.append(chunk))
    P.prepare("imagenet128", str(tmp_path / "src"), out, R, workers=1, progress=False, chunk_size=4)
    assert done == [2]  # only the last of the three chunks was decoded again
    assert not partial.exists()
    for name in ("images.npy", "labels.npy"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert manifest(out)["sha256"] == manifest(clean)["sha256"]
    assert manifest(out)["skipped"] == manifest(clean)["skipped"]


KILL_SCRIPT = """
import multiprocessing, os, signal, sys
sys.path.insert(0, {repo!r})
from bench.data import prepare as P

def hook(split, chunk):
    if chunk == 1:  # die hard after two chunks, workers still running: no cleanup of any kind
        with open({pids!r}, "w") as f:
            f.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
        os.kill(os.getpid(), signal.SIGKILL)

P._after_chunk = hook
P.prepare("imagenet128", {src!r}, {out!r}, 16, workers=2, progress=False, chunk_size=4)
"""


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def wait_for_exit(pid: int, limit_s: float) -> None:
    """Block until process `pid` (not a child of ours) has ended: its pidfd turns readable then.
    A process that is already gone (or a zombie) returns at once."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], limit_s)
    finally:
        os.close(fd)


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "pidfd_open"),
                    reason="reads /proc and waits on pidfds to see the workers end")
def test_sigkill_leaves_a_resumable_partial_and_no_orphans(tmp_path):
    make_tree(tmp_path / "src")
    out, pids = tmp_path / "out", tmp_path / "pids"
    script = KILL_SCRIPT.format(repo=str(Path(P.__file__).parents[2]), pids=str(pids), src=str(tmp_path / "src"),
                                out=str(out))
    with open(tmp_path / "stderr", "wb") as err:  # a file, not a pipe: orphaned workers would hold a pipe open
        proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=err, timeout=900)  # catches a hang only
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    assert json.loads((tmp_path / "out.partial" / "progress-train.json").read_text())["chunks_done"] == 2
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    for pid in workers:  # wait on each worker's exit (a pidfd becomes readable when it ends), not on the clock
        wait_for_exit(pid, limit_s=120)  # the limit only catches a hang
    assert not any(alive(p) for p in workers), "decode workers outlived their killed parent"
    P.prepare("imagenet128", str(tmp_path / "src"), out, R, workers=1, progress=False)
    clean = P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "clean", R, workers=1, progress=False)
    assert (out / "images.npy").read_bytes() == (clean / "images.npy").read_bytes()
    assert manifest(out)["sha256"] == manifest(clean)["sha256"]


def test_resume_refuses_a_changed_source(tmp_path, monkeypatch):
    make_tree(tmp_path / "src", per_class=2)

    def kill(split, chunk):
        raise Killed("killed after the first chunk")

    monkeypatch.setattr(P, "_after_chunk", kill)
    with pytest.raises(Killed, match="^killed after the first chunk$"):
        P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "out", R, workers=1, progress=False, chunk_size=2)
    monkeypatch.setattr(P, "_after_chunk", lambda split, chunk: None)
    photo(99).save(tmp_path / "src" / WNIDS[0] / f"{WNIDS[0]}_new.JPEG")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path / 'out.partial'))} holds an unfinished "
                                           r"preparation .*\(the source changed since it began\); pass --force") as exc:
        P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "out", R, workers=1, progress=False)
    assert "source changed" in one_line(exc) and "--force" in one_line(exc)
    P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "out", R, workers=1, progress=False, force=True)
    assert manifest(tmp_path / "out")["counts"]["written"] == 7


def test_existing_output_is_refused_unless_forced(tmp_path):
    make_tree(tmp_path / "src", per_class=1)
    out = P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "out", R, workers=1, progress=False)
    before = (out / "images.npy").read_bytes()
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(out))} already holds a prepared dataset; ") as exc:
        P.prepare("imagenet128", str(tmp_path / "src"), out, 8, workers=1, progress=False)
    assert "--force" in one_line(exc)
    assert (out / "images.npy").read_bytes() == before
    P.prepare("imagenet128", str(tmp_path / "src"), out, 8, workers=1, progress=False, force=True)
    assert np.load(out / "images.npy").shape == (3, 3, 8, 8) and not (tmp_path / "out.old").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path / 'other'))} exists and is not a prepared "):
        P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "other", R, workers=1, progress=False, force=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_verify_prepared_catches_a_manifest_that_does_not_match(tmp_path):
    make_tree(tmp_path / "src", per_class=2)
    out = P.prepare("imagenet128", str(tmp_path / "src"), tmp_path / "out", R, workers=1, progress=False)
    assert P.verify_prepared(out, check_hash=True)["counts"]["written"] == 6
    images = out / "images.npy"
    data = images.read_bytes()

    images.write_bytes(data[:-100])  # cut short
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(images))} is {len(data) - 100} bytes, {len(data)} "
                                           r"expected \(cut short or altered\); re-run prepare") as exc:
        P.verify_prepared(out)
    assert "images.npy" in one_line(exc) and "re-run prepare" in one_line(exc)

    np.save(images, np.load(out / "labels.npy")[:5].astype(np.uint8))  # another shape altogether
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(images))} holds uint8 \(5,\), the manifest says "
                                           rf"uint8 \(6, 3, {R}, {R}\); re-run prepare") as exc:
        P.verify_prepared(out)
    assert "images.npy" in one_line(exc)

    images.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    P.verify_prepared(out)  # the cheap check passes
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(images))} does not match the sha256 in its ") as exc:
        P.verify_prepared(out, check_hash=True)
    assert "sha256" in one_line(exc)

    images.unlink()
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(images))} is missing; re-run prepare") as exc:
        P.verify_prepared(out)
    assert "missing" in one_line(exc)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path / 'src'))} is not a prepared dataset "
                                           r"\(no readable manifest\.json\); make one with: python run_bench\.py "):
        P.verify_prepared(tmp_path / "src")


# --------------------------------------------------------------------------------------------
# folder:PATH and cifar10


def test_folder_with_class_subfolders_and_flat(tmp_path):
    src = tmp_path / "pets"
    for cls, names in {"dog": ["a.PNG", "b.jpg"], "cat": ["c.bmp", "sub/d.JPEG"], "empty": []}.items():
        (src / cls / "sub").mkdir(parents=True)
        for i, name in enumerate(names):
            photo(i, (30 + 7 * i, 22)).save(src / cls / name)
    (src / "cat" / "readme.txt").write_text("not an image")
    out = P.prepare(f"folder:{src}", None, tmp_path / "out", R, workers=1, progress=False)
    images, labels = arrays(out)
    m = manifest(out)
    assert m["label_map"] == {"cat": 0, "dog": 1} and m["labelled"] and m["source"]["kind"] == "folder-classes"
    assert images.shape == (4, 3, R, R) and labels.tolist() == [0, 0, 1, 1]

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        photo(i).save(flat / f"{i}.png")
    out = P.prepare("folder", str(flat), tmp_path / "flat-out", R, workers=2, progress=False)
    m = manifest(out)
    assert not m["labelled"] and "unlabelled" in m["label_map"] and arrays(out)[1].tolist() == [-1] * 3

    with pytest.raises(ConfigError, match=r"^folder:PATH needs --resolution R ") as exc:
        P.prepare(f"folder:{flat}", None, tmp_path / "x", None, progress=False)
    assert "--resolution" in one_line(exc)
    photo(5).save(src / "loose.png")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(src))} has images both at the top \(loose\.png, \.\.\.\) "
                                           r"and in class subfolders; move the top-level images") as exc:
        P.prepare(f"folder:{src}", None, tmp_path / "y", R, progress=False)
    assert "loose.png" in one_line(exc)


def fake_cifar(root, n=3):
    """cifar-10-batches-py with n images per batch file: what datasets/cifar10.py reads locally."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [(i + j) % 10 for j in range(n)]}
        (base / name).write_bytes(pickle.dumps(entry))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in range(10)]}))


def test_cifar10_writes_both_splits_unchanged_at_32px(tmp_path):
    pytest.importorskip("torchvision")
    fake_cifar(tmp_path / "c")
    out = P.prepare("cifar10", str(tmp_path / "c"), tmp_path / "out", workers=1, progress=False)
    m = manifest(out)
    assert m["resolution"] == 32 and set(m["splits"]) == {"train", "test"}
    from bench.data.loading import dataset_info

    for split, n in (("train", 15), ("test", 3)):
        raw, raw_labels = dataset_info("cifar10").load(split, str(tmp_path / "c"), tmp_path)
        images, labels = P.load_prepared(out, split)
        assert images.shape == (n, 3, 32, 32)
        np.testing.assert_array_equal(images, raw)  # 32 -> 32 is the identity: no halving, no resize
        np.testing.assert_array_equal(labels, raw_labels)


# --------------------------------------------------------------------------------------------
# Loaders and the command line


def test_loaders_return_memory_maps(tmp_path, monkeypatch):
    from bench.data.loading import dataset_info

    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    make_tree(tmp_path / "src", per_class=1)
    imagenet = dataset_info("imagenet128")
    with pytest.raises(FileNotFoundError, match="prepare imagenet128"):
        imagenet.load("train", None, tmp_path)
    with pytest.raises(FileNotFoundError, match="ref_split"):
        imagenet.load("test", None, tmp_path)
    P.prepare("imagenet128", str(tmp_path / "src"), None, workers=1, progress=False)  # default out, 128 px
    images, labels = imagenet.load("train", None, tmp_path)
    assert isinstance(images, np.memmap) and images.shape == (3, 3, 128, 128) and labels.tolist() == [0, 1, 2]

    out = P.prepare(f"folder:{tmp_path / 'src'}", None, tmp_path / "small", R, workers=1, progress=False)
    folder = dataset_info("folder")
    images, labels = folder.load("train", str(out), tmp_path)
    assert isinstance(images, np.memmap) and images.mode == "r" and images.shape == (3, 3, R, R)
    with pytest.raises(FileNotFoundError, match="ref_split"):
        folder.load("test", str(out), tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare folder:PATH"):
        folder.load("train", None, tmp_path)
    with pytest.raises(FileNotFoundError, match="not imagenet128"):
        imagenet.load("train", str(out), tmp_path)


def test_cli_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    make_tree(tmp_path / "src", per_class=1)
    parser = argparse.ArgumentParser()
    P.add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", f"folder:{tmp_path / 'src'}", "--resolution", "8", "--workers", "1"])
    args.func(args)
    path, summary = capsys.readouterr().out.splitlines()
    assert path == str(tmp_path / "cache" / "prepared" / "src-8")
    assert summary.startswith("3 images written, 0 skipped,") and summary.endswith("images/s")
    args = parser.parse_args(["prepare", f"folder:{tmp_path / 'src'}", "extra", "--resolution", "8"])
    with pytest.raises(BenchError, match=r"^folder:PATH takes its path after the colon; drop the extra SRC 'extra'$"):
        args.func(args)
    args = parser.parse_args(["prepare", "mnist"])
    with pytest.raises(ConfigError, match=r"^unknown prepare kind 'mnist'; use imagenet128, cifar10 or folder:PATH$"):
        args.func(args)


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "train-00000.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what an environment without pyarrow sees
    with pytest.raises(DatasetError, match=r"^reading parquet shards needs pyarrow, .*pip install pyarrow$") as exc:
        P.prepare("imagenet128", str(tmp_path / "hf"), tmp_path / "out", R, workers=1, progress=False)
    assert "pip install pyarrow" in one_line(exc)
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("workers", [0, -2])
def test_workers_below_one_are_refused(tmp_path, workers):
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--workers {workers} must be at least 1"):
        P.prepare("imagenet128", str(tmp_path), tmp_path / "out", R, workers=workers, progress=False)
    assert not (tmp_path / "out").exists()
