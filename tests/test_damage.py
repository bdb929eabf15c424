"""Issue 30 items 6-8: damage that used to go unseen. A checkpoint is checked by the SHA-256 sealed in
its own bytes, whether or not its digest files are there; a hole or a copied line in a run's logs is
refused or dropped at the resume and in the report, never carried; a damaged cached reference or
noise floor is recomputed, saying so. Each test damages a tiny run (or cache) itself."""

import json
import shutil
import struct
import zipfile

import numpy as np
import pytest
from conftest import train_until

from bench.errors import CheckpointError, ConfigError
from bench.train.loop import TrainConfig, train

SMALL = dict(dataset="synthetic", arch="unet-micro", iters=6, batch_size=4, ckpt_every=2)
# An evaluating run: evaluations (and checkpoints) at steps 2 and 4, two metrics each.
EVAL = dict(dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, ckpt_every=2, eval_every=2,
            eval={"metrics": ["proxy_fd", "proxy_kid"], "num_images": 8, "sampler_steps": 1})


def logged(run_dir, name):
    """A log's rows without the clock's fields (the only ones a rerun may change)."""
    rows = [json.loads(x) for x in (run_dir / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.endswith("seconds") or k.endswith("per_s"))} for r in rows]


def flip_tensor_byte(path):
    """Change one byte in the middle of the largest tensor a torch checkpoint holds: still a valid zip,
    still loads (torch checks no CRC), other weights."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the member's bytes (stored, not compressed)
    data[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SMALL trained to its end ("clean"), and stopped after step 5 ("stopped": checkpoints at 4 and 2,
    checkpoint.pt and checkpoint.prev.pt); each test damages its own copy."""
    root = tmp_path_factory.mktemp("runs")
    train(TrainConfig(**SMALL), root / "clean")
    train_until(TrainConfig(**SMALL), root / "stopped", 5)
    return root


def stopped(runs, tmp_path, digests=False, previous=True):
    """A copy of the stopped run; without its digest files unless `digests`, without checkpoint.prev.pt
    unless `previous`."""
    run = shutil.copytree(runs / "stopped", tmp_path / "run")
    for path in run.glob("checkpoint*"):
        if (path.suffix == ".sha256" and not digests) or (path.name.startswith("checkpoint.prev") and not previous):
            path.unlink()
    return run


# -- item 6: the checkpoint's own seal --------------------------------------------------------------


def test_an_altered_checkpoint_without_digest_files_is_refused_and_the_previous_one_used(runs, tmp_path, capsys):
    run = stopped(runs, tmp_path)
    flip_tensor_byte(run / "checkpoint.pt")
    capsys.readouterr()
    assert train(TrainConfig(**SMALL), run)["state"] == "done"
    err = capsys.readouterr().err
    assert "checkpoint.pt is damaged (cut or altered: its bytes do not match the SHA-256 sealed at its end)" in err
    assert "moved to checkpoint.rejected.pt, resuming from checkpoint.prev.pt" in err
    assert logged(run, "steps.jsonl") == logged(runs / "clean", "steps.jsonl")  # the uninterrupted run's numbers


def test_a_damaged_only_checkpoint_is_one_error_saying_restart(runs, tmp_path):
    run = stopped(runs, tmp_path, previous=False)  # no previous checkpoint to fall back on
    flip_tensor_byte(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is damaged .*; no good checkpoint is left: delete it "
                                              r"to restart the run from scratch") as info:
        train(TrainConfig(**SMALL), run)
    assert "\n" not in str(info.value)


def test_a_checkpoint_whose_seal_was_cut_off_is_refused(runs, tmp_path):
    """Cut exactly at the seal, the file is torch's plain zip again, as checkpoints from before seals were:
    the checkpoint itself says it was sealed."""
    from bench.train.checkpoint import SEAL_BYTES

    run = stopped(runs, tmp_path, previous=False)
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-SEAL_BYTES])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is damaged \(it was written with a SHA-256 sealed at "
                                              r"its end, and that seal is gone\)"):
        train(TrainConfig(**SMALL), run)


def test_a_checkpoint_from_before_seals_resumes_with_its_digest_file(runs, tmp_path):
    import torch

    from bench.train.checkpoint import sha256_file

    run = stopped(runs, tmp_path, digests=True)
    ckpt = run / "checkpoint.pt"
    old = torch.load(ckpt, weights_only=True)
    del old["sealed"]
    torch.save(old, ckpt)  # as written before seals: a plain zip, its SHA-256 in checkpoint.sha256
    (run / "checkpoint.sha256").write_text(json.dumps({"step": 4, "sha256": sha256_file(ckpt)}))
    assert train(TrainConfig(**SMALL), run)["state"] == "done"
    assert not (run / "checkpoint.rejected.pt").exists()
    assert logged(run, "steps.jsonl") == logged(runs / "clean", "steps.jsonl")


# -- item 7: holes and copies in the logs -----------------------------------------------------------


def test_a_line_logged_twice_before_the_checkpoint_is_dropped_at_the_resume(runs, tmp_path, capsys):
    run = stopped(runs, tmp_path)
    steps = run / "steps.jsonl"
    lines = steps.read_text().splitlines(keepends=True)
    steps.write_text("".join(lines[:3] + lines[2:]))  # step 3's row twice
    capsys.readouterr()
    assert train(TrainConfig(**SMALL), run)["state"] == "done"
    assert f"note: {steps}: 1 row(s) logged twice dropped (identical copies)" in capsys.readouterr().err
    assert logged(run, "steps.jsonl") == logged(runs / "clean", "steps.jsonl")  # 6 rows, not 7


def test_two_different_rows_for_one_step_refuse_the_resume(runs, tmp_path):
    run = stopped(runs, tmp_path)
    steps = run / "steps.jsonl"
    lines = steps.read_text().splitlines(keepends=True)
    other = json.dumps({**json.loads(lines[2]), "loss": 123.0}) + "\n"
    steps.write_text("".join(lines[:3] + [other] + lines[3:]))
    with pytest.raises(ConfigError, match=rf"{steps} has two different rows for step 3, both before checkpoint\.pt "
                                          r"\(step 4\).*delete the run folder to train the run again"):
        train(TrainConfig(**SMALL), run)


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    """An evaluating run trained to its end, and one stopped after step 3 (its checkpoint and evaluation
    at step 2), with their own cache."""
    root = tmp_path_factory.mktemp("evals")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFBENCH_CACHE", str(root / "cache"))
        train(TrainConfig(**EVAL), root / "done")
        train_until(TrainConfig(**EVAL), root / "stopped", 3)
    return root


def copy_run(eval_runs, name, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(eval_runs / "cache"))
    return shutil.copytree(eval_runs / name, tmp_path / name)


def test_an_evaluation_cut_before_the_checkpoint_refuses_the_resume(eval_runs, tmp_path, monkeypatch):
    run = copy_run(eval_runs, "stopped", tmp_path, monkeypatch)
    evals = run / "evals.jsonl"
    text = evals.read_text()
    assert [json.loads(x)["step"] for x in text.splitlines()] == [2, 2]
    evals.write_text(text[: len(text) // 4])  # cut half-way through step 2's first row: a torn last line
    with pytest.raises(ConfigError, match=rf"{evals} has no row for the evaluation of step 2 \(1 missing\) that "
                                          r"checkpoint\.pt \(step 2\) made.*delete the run folder to train the run "
                                          r"again \(from scratch\)") as info:
        train(TrainConfig(**EVAL), run)
    assert "\n" not in str(info.value)
    evals.write_text(text.splitlines(keepends=True)[0])  # one metric of the two: proxy_kid's row gone
    with pytest.raises(ConfigError, match=r"no row for the evaluation of proxy_kid at step 2"):
        train(TrainConfig(**EVAL), run)


def test_an_evaluation_logged_twice_is_dropped_at_the_resume(eval_runs, tmp_path, monkeypatch, capsys):
    run = copy_run(eval_runs, "stopped", tmp_path, monkeypatch)
    evals = run / "evals.jsonl"
    evals.write_text(evals.read_text() * 2)
    capsys.readouterr()
    assert train(TrainConfig(**EVAL), run)["state"] == "done"
    assert f"note: {evals}: 2 row(s) logged twice dropped" in capsys.readouterr().err
    assert logged(run, "evals.jsonl") == logged(eval_runs / "done", "evals.jsonl")


def suite_of(eval_runs, tmp_path):
    """A results folder holding the done run (the report's layout)."""
    suite = tmp_path / "suite"
    shutil.copytree(eval_runs / "done", suite / "synthetic_unet-micro" / "baseline" / "seed0")
    return suite, suite / "synthetic_unet-micro" / "baseline" / "seed0" / "evals.jsonl"


def test_the_report_reads_a_copied_evaluation_once(eval_runs, tmp_path, capsys):
    from bench.report.tables import evaluations_table, find_runs

    suite, evals = suite_of(eval_runs, tmp_path)
    lines = evals.read_text().splitlines(keepends=True)
    evals.write_text("".join(lines + lines[:1]))
    runs = find_runs(suite)
    assert f"note: {evals}: 1 evaluation row(s) logged twice read once" in capsys.readouterr().err
    table = evaluations_table(suite, runs)
    assert runs[0]["status"]["state"] == "done" and len(table) == 4
    assert sorted(zip(table.step, table.metric)) == [(2, "proxy_fd"), (2, "proxy_kid"), (4, "proxy_fd"),
                                                      (4, "proxy_kid")]


@pytest.mark.parametrize("damage, reason", [
    ("conflict", "has two different rows for step 2 metric proxy_fd: its evaluations are left out"),
    ("hole", "evals.jsonl has no row for the evaluation of step 2 (1 missing): its evaluations are left out"),
])
def test_the_report_leaves_out_a_run_whose_evaluations_conflict_or_are_missing(eval_runs, tmp_path, damage, reason):
    from bench.report.tables import evaluations_table, find_runs

    suite, evals = suite_of(eval_runs, tmp_path)
    lines = evals.read_text().splitlines(keepends=True)
    if damage == "conflict":
        lines.append(json.dumps({**json.loads(lines[0]), "value": 1.0}) + "\n")
    else:
        lines = lines[2:]  # step 2's two rows gone
    evals.write_text("".join(lines))
    runs = find_runs(suite)
    assert runs[0]["status"]["state"] == "failed" and reason in runs[0]["status"]["reason"]
    assert len(evaluations_table(suite, runs)) == 0


# -- item 8: damaged caches -------------------------------------------------------------------------

SPEC = {"dataset": "synthetic", "metrics": ["proxy_fd", "proxy_kid"], "num_images": 8, "sampler_steps": 1}


def prepared(tmp_path):
    """(the reference's cache file, its noise floor's, the prepared (extractor, reference, floor))."""
    from bench.eval.evaluate import Evaluator

    ev = Evaluator({**SPEC, "cache_dir": str(tmp_path / "cache")})
    ev.prepare()
    ext, ref, floor = ev.prepared_families["proxy"]
    (floor_file,) = ref.path.parent.glob(f"{ref.path.stem}-floor*.json")
    return ref.path, floor_file, (ext, ref, floor)


def test_a_cut_or_altered_reference_is_recomputed_saying_so(tmp_path, capsys):
    from bench.eval.reference import prepare_references

    path, _, (_, ref, _) = prepared(tmp_path)
    whole = path.read_bytes()
    spec = {**SPEC, "cache_dir": str(tmp_path / "cache")}
    for damaged, why in ((whole[: len(whole) // 2], "unreadable: BadZipFile"),
                         (whole.replace(ref.mu.astype(np.float64).tobytes()[:8], bytes(8), 1),
                          "unreadable: BadZipFile")):  # a byte of mu changed: the zip's CRC-32
        path.write_bytes(damaged)
        capsys.readouterr()
        (row,) = prepare_references([spec], device="cpu")
        assert f"note: reference statistics {path} are damaged ({why}); recomputing them" in capsys.readouterr().err
        assert row["ref_sha256"] == ref.sha256 and row["cached"] is False
        assert path.read_bytes() != damaged


def test_a_reference_that_does_not_match_its_recorded_hash_is_recomputed(tmp_path, capsys):
    from bench.eval.fid import read_cached_stats

    path, _, (_, ref, _) = prepared(tmp_path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mu"] = arrays["mu"] + 1.0  # a file rewritten whole (valid zip, valid CRCs), other statistics
    np.savez(path, **arrays)
    stats, why = read_cached_stats(path, ref.key)
    assert stats is None and why == "its statistics do not match the SHA-256 it records"
    _, _, (_, again, _) = prepared(tmp_path)
    assert again.computed and again.sha256 == ref.sha256


def test_a_reference_with_damaged_features_is_one_line_when_kid_reads_them(tmp_path):
    path, _, (_, ref, _) = prepared(tmp_path)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("feats.npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + info.compress_size] ^= 0x01  # inside the features' bytes, past their header
    path.write_bytes(bytes(data))
    from bench.eval.fid import read_cached_stats

    stats, why = read_cached_stats(path, ref.key)  # mu, sigma and the features' shape are whole
    assert why is None
    with pytest.raises(ConfigError, match=r"their features do not load \(BadZipFile: the file is damaged\); delete it"):
        stats.features()


@pytest.mark.parametrize("content, why", [
    ('{"source": "x", "fid": 1.0}', "it lacks fd, kid"),
    ("[1, 2]", "it lacks source, fd and kid"),
    ('{"source": "x", "fd": "1.0", "kid": 0.1}', "are not a floor's"),
    ('{"source": "x", "fd": 1.0, "kid": 0.1, "ref_sha256": "0123456789abcdef"}', "other reference statistics"),
    ('{"source": "x", "fd": 1.', "unreadable: JSONDecodeError"),
])
def test_a_damaged_noise_floor_is_recomputed_saying_so(tmp_path, capsys, content, why):
    _, floor_file, (_, _, floor) = prepared(tmp_path)
    assert floor["state"] == "computed" and isinstance(floor["fd"], float)
    floor_file.write_text(content)
    capsys.readouterr()
    _, _, (_, _, again) = prepared(tmp_path)
    err = capsys.readouterr().err
    assert f"note: noise floor {floor_file} is damaged (" in err and why in err and "recomputing it" in err
    assert again["state"] == "computed" and again["fd"] == floor["fd"] and again["kid"] == floor["kid"]
    _, _, (_, _, cached) = prepared(tmp_path)
    assert cached["state"] == "cached" and cached["fd"] == floor["fd"]
