"""Devices, the fast path and multi-process training (bench/core/runtime.py), on this CPU with gloo.

Two torchrun processes at global batch 16 must train like one process at batch 16: every
process draws its half of the batch (the same images, noise and timesteps one process draws for
those rows), and DDP averages the gradients. Tolerance: per-step losses and MSE quartiles within 1e-6 relative (the only
difference is the order of float sums), weights within 5e-5 absolute after 5 steps at lr 1e-3
without warm-up (measured: 4.4e-6; a wrong slice or an unaveraged gradient moves weights by
~1e-3 per step). Tests that need CUDA are skipped without one; `python -m bench.gpu_check`
runs them on a GPU.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, needs_inception, train_until

from bench import fileio
from bench.errors import ConfigError
from bench.suite.slurm import slurm_parameters
from bench.train.loop import TrainConfig, TrainEvents, train

PLUGINS = Path(__file__).resolve().parent / "plugins"
TINY = ["--dataset", "synthetic", "--arch", "unet-tiny", "--iters", "5", "--batch-size", "16", "--warmup", "0",
        "--lr", "1e-3"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def needs_cuda(test):
    """A `cuda` test: skipped without a GPU (conftest hides GPUs unless DIFFBENCH_TEST_CUDA=1)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU "
                                               "(python -m bench.gpu_check runs it)")(test))


def cli(n: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """run_bench.py as one process, or as n torchrun processes."""
    launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc_per_node={n}"]
    return subprocess.run([*launch, str(REPO / "run_bench.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)  # catches a hang only


def steps(run_dir) -> list[dict]:
    return fileio.read_jsonl(Path(run_dir) / "steps.jsonl")


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "images_per_s"} for r in rows]


def state(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(1, "train", *TINY, "--out", str(one)).returncode == 0
    r = cli(2, "train", *TINY, "--out", str(two))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = steps(one), steps(two)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for key in ("loss", "mse", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), key
    sa, sb = state(one), state(two)
    assert sb["world_size"] == 2 and len(sb["rng_processes"]) == 2
    for part in ("model", "ema"):
        for name, w in sa[part].items():
            assert torch.allclose(w, sb[part][name], rtol=0, atol=5e-5), (part, name)
    # The weights did move, by far more than the tolerance: it would not hide a wrong update.
    from bench.models.networks import build_model

    torch.manual_seed(0)
    init = build_model("unet-tiny", 1, 16).state_dict()
    assert max((sb["model"][k] - init[k]).abs().max().item() for k in init) > 2e-3
    runtime = json.loads((two / "config.json").read_text())["runtime"]
    assert runtime[-1]["world_size"] == 2 and runtime[-1]["backend"] == "gloo" and runtime[-1]["device"] == "cpu"
    assert json.loads((two / "config.json").read_text())["gpus"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("loss_aware", ["--set", "history=2", "--T", "16", "--schedule", "cosine"]),  # feedback: every rank's losses
    ("repa", ["--set", "proj_dim=32"]),  # an extra trainable module inside DDP
])
def test_two_processes_train_like_one_with_a_feedback_or_aux_method(tmp_path, method, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", *TINY, "--method", method, *extra]
    assert cli(1, *args, "--out", str(one)).returncode == 0
    r = cli(2, *args, "--out", str(two))
    assert r.returncode == 0, r.stderr[-2000:]
    for x, y in zip(steps(one), steps(two)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-8)
    sa, sb = state(one), state(two)
    for part in ("model", "aux") if method == "repa" else ("model",):
        for name, w in sa[part].items():
            assert torch.allclose(w, sb[part][name], rtol=0, atol=5e-5), (part, name)
    if method == "loss_aware":  # both processes fed back the whole global batch: one table, the one-process one's
        assert torch.equal(sa["method_state"]["counts"], sb["method_state"]["counts"])
        torch.testing.assert_close(sa["method_state"]["losses"], sb["method_state"]["losses"], rtol=1e-5, atol=1e-7)
        assert int(sb["method_state"]["counts"].sum()) > 16  # some t were seen twice: the table filled


@pytest.mark.slow
def test_two_process_checkpoint_resumes_bit_for_bit_and_one_process_is_refused(tmp_path):
    args = ["train", *TINY[:4], "--iters", "8", "--batch-size", "8", "--warmup", "0", "--lr", "1e-3",
            "--ckpt-every", "4", "--method", "faulty", "--plugins", str(PLUGINS / "faulty.py")]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli(2, *args, "--out", str(whole)).returncode == 0
    killed = cli(2, *args, "--out", str(parts), env={"FAULTS": "a:kill@6"})  # both processes die in step 6
    assert killed.returncode != 0
    assert fileio.read_json(parts / "status.json")["step"] == 4 and state(parts)["step"] == 4

    refused = cli(1, *args, "--out", str(parts))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "gpus=2" in lines[0] and "nproc_per_node 2" in lines[0]
    assert state(parts)["step"] == 4  # nothing changed

    assert cli(2, *args, "--out", str(parts)).returncode == 0
    assert strip_timing(steps(whole)) == strip_timing(steps(parts))
    a, b = state(whole), state(parts)
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    # Finished, the run is done whatever the process count asking.
    again = cli(1, *args, "--out", str(parts))
    assert again.returncode == 0 and "done at step 8" in again.stdout


def test_a_resumed_run_uses_this_machines_optimizer_kernel(tmp_path):
    """load_state_dict brings back the saved optimizer's kernel (fused, from a GPU); the runtime's wins."""
    from bench.train.checkpoint import resume
    from bench.train.loop import setup
    from bench.train.resolve import resolve_run

    cfg = TrainConfig(dataset="synthetic", arch="unet-micro", iters=4, batch_size=4, ckpt_every=2)
    out = tmp_path / "run"
    train(cfg, out)
    ckpt = state(out)
    for group in ckpt["opt"]["param_groups"]:  # as a fused GPU run saves it
        group["fused"], group["foreach"] = True, None
    torch.save(ckpt, out / "checkpoint.pt")
    s = setup(cfg, resolve_run(cfg).method)
    resume(s, out / "checkpoint.pt")
    assert all(g["fused"] is None and g["foreach"] is True for g in s.opt.param_groups)
    assert all(st["step"].device.type == "cpu" for st in s.opt.state.values())


def test_resume_refuses_a_checkpoint_of_another_process_count(tmp_path):
    """A launch error (ConfigError), not a bad checkpoint: resume_latest never sets the checkpoint aside for it."""
    from bench.errors import CheckpointError, ConfigError
    from bench.train.checkpoint import resume
    from bench.train.loop import setup

    cfg = TrainConfig(dataset="synthetic", arch="unet-micro", iters=2, batch_size=4)
    out = tmp_path / "run"
    train(cfg, out)
    ckpt = state(out)
    ckpt["world_size"] = 4
    torch.save(ckpt, out / "checkpoint.pt")
    from bench.train.resolve import resolve_run

    with pytest.raises(ConfigError, match="4 process.*this run has 1.*nproc_per_node 4") as info:
        resume(setup(cfg, resolve_run(cfg).method), out / "checkpoint.pt")
    assert not isinstance(info.value, CheckpointError)


def test_bf16_autocast_on_the_cpu_keeps_fp32_master_weights(tmp_path):
    base = dict(dataset="synthetic", arch="unet-tiny", iters=5, batch_size=8, warmup=0, lr=1e-3)
    train(TrainConfig(**base, precision="bf16"), tmp_path / "bf16")
    train(TrainConfig(**base), tmp_path / "fp32")
    rows = steps(tmp_path / "bf16")
    assert len(rows) == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ck = state(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 for part in ("model", "ema") for w in ck[part].values())
    assert all(v.dtype == torch.float32 for s in ck["opt"]["state"].values() for k, v in s.items() if k != "step")
    # autocast did run: bf16's rounding changes the losses
    assert [r["loss"] for r in rows] != [r["loss"] for r in steps(tmp_path / "fp32")]
    runtime = json.loads((tmp_path / "bf16" / "config.json").read_text())["runtime"]
    assert runtime == [{**runtime[0], "from_step": 0, "device": "cpu", "precision": "bf16", "tf32": False,
                        "fused_adamw": False, "compile": False, "world_size": 1, "backend": None}]
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["runtime"][0]["precision"] == "fp32"


def test_the_fast_path_is_off_on_the_cpu_and_changes_nothing(tmp_path):
    """device auto on a CPU: fp32, no TF32, no fused AdamW; the same numbers as device = "cpu"."""
    base = dict(dataset="synthetic", arch="unet-micro", iters=3, batch_size=4)
    train(TrainConfig(**base), tmp_path / "auto")
    train(TrainConfig(**base, device="cpu", precision="fp32", tf32=False, fused_adamw=False), tmp_path / "cpu")
    assert strip_timing(steps(tmp_path / "auto")) == strip_timing(steps(tmp_path / "cpu"))


def test_a_run_resumes_under_other_runtime_settings_and_records_each_stretch(tmp_path):
    base = dict(dataset="synthetic", arch="unet-micro", iters=6, batch_size=4, ckpt_every=3)

    train_until(TrainConfig(**base), tmp_path / "run", 4)
    status = train(TrainConfig(**base, precision="bf16"), tmp_path / "run")
    assert status["state"] == "done"
    runtime = json.loads((tmp_path / "run" / "config.json").read_text())["runtime"]
    assert [(r["from_step"], r["precision"]) for r in runtime] == [(0, "fp32"), (3, "bf16")]


@pytest.mark.parametrize("args, what", [
    (["--device", "gpu"], "device='gpu'"),
    (["--precision", "fp16"], "precision='fp16'"),
])
def test_bad_runtime_values_are_one_error_line_and_write_nothing(tmp_path, args, what):
    r = cli(1, "train", *TINY[:4], "--iters", "2", *args, "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_global_batch_the_processes_do_not_divide_is_refused(tmp_path):
    r = cli(2, "train", *TINY[:4], "--iters", "2", "--batch-size", "15", "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("batch_size=15 is not divisible by gpus=2" in e for e in errors)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("train_table, what", [
    ("gpus = 0", "gpus"),
    ("gpus = 3", "not divisible by gpus=3"),
    ('device = "tpu"', "device"),
    ('precision = "half"', "precision"),
    ("compile = 1", "compile"),
    ('device = "cuda:1"\ngpus = 2', "names one GPU"),
])
def test_bad_runtime_settings_in_a_suite_are_refused_at_load(tmp_path, train_table, what):
    from bench.suite.grid import load_suite

    p = tmp_path / "s.toml"
    p.write_text(f"""[grid]\nmethods = ["baseline"]\ndatasets = ["synthetic"]\narchs = ["unet-micro"]\nseeds = [0]
[budget]\niters = 2\nbatch_size = 4\n[train]\n{train_table}\n[eval]\nevery = 2\nmetrics = ["proxy_fd"]\n""")
    with pytest.raises(ConfigError, match=what):
        load_suite(p)


@no_cuda
def test_cuda_where_there_is_none_is_one_error_line(tmp_path):
    r = cli(1, "train", *TINY[:4], "--iters", "2", "--device", "cuda", "--out", str(tmp_path / "run"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "sees none" in lines[0] and "--device cpu" in lines[0]
    assert not (tmp_path / "run").exists()


@no_cuda
def test_the_runner_refuses_cuda_runs_before_anything_runs(tmp_path):
    from bench.suite.grid import load_suite
    from bench.suite.runner import run_suite

    p = tmp_path / "s.toml"
    p.write_text("""[grid]\nmethods = ["baseline"]\ndatasets = ["synthetic"]\narchs = ["unet-micro"]\nseeds = [0]
[budget]\niters = 2\nbatch_size = 4\n[train]\ndevice = "cuda"\n[eval]\nevery = 2\nmetrics = ["proxy_fd"]\n""")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run_suite(load_suite(p), results_root=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


@needs_cuda
def test_a_gpu_checkpoint_resumes_on_the_cpu_and_back(tmp_path):
    base = dict(dataset="synthetic", arch="unet-micro", iters=6, batch_size=4, ckpt_every=2)

    train_until(TrainConfig(**base, device="cuda"), tmp_path / "run", 3)
    train_until(TrainConfig(**base, device="cpu"), tmp_path / "run", 5)
    assert train(TrainConfig(**base, device="cuda"), tmp_path / "run")["state"] == "done"
    runtime = json.loads((tmp_path / "run" / "config.json").read_text())["runtime"]
    assert [(r["from_step"], r["device"].split(":")[0]) for r in runtime] == [(0, "cuda"), (2, "cpu"), (4, "cuda")]


def test_slurm_jobs_of_multi_process_runs_get_one_task_per_gpu():
    p = slurm_parameters({"partition": "gpu", "time": 60}, "s", "slurm", gpus=4)
    assert p["tasks_per_node"] == 4 and p["gpus_per_node"] == 4 and p["nodes"] == 1
    assert slurm_parameters({"gpus": 1}, "s", "slurm")["gpus_per_node"] == 1
    assert "tasks_per_node" not in slurm_parameters({"gpus": 1}, "s", "slurm")
    with pytest.raises(ConfigError, match="gpus=1 but the runs train with gpus = 4"):
        slurm_parameters({"gpus": 1}, "s", "slurm", gpus=4)
    with pytest.raises(ConfigError, match="submitit-debug"):
        slurm_parameters({}, "s", "debug", gpus=2)


SUITE = """
[suite]
name = "dd"
[grid]
methods = ["baseline"]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0]
[budget]
iters = 4
batch_size = 8
[train]
gpus = {gpus}
ckpt_every = 2
[eval]
every = 4
metrics = ["proxy_fd"]
num_images = 8
sampler_steps = 2
batch_size = 8
"""


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_a_suite_with_gpus_2_trains_through_torchrun_or_two_tasks(tmp_path, executor, monkeypatch):
    from bench.suite.grid import load_suite
    from bench.suite.runner import run_suite

    if executor != "local":
        pytest.importorskip("submitit")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for gpus in (1, 2):
        p = tmp_path / f"dd{gpus}.toml"
        p.write_text(SUITE.format(gpus=gpus).replace('name = "dd"', f'name = "dd{gpus}"'))
        res = run_suite(load_suite(p), executor=executor, results_root=tmp_path / "r", progress=False,
                        slurm={"time": 5})
        assert res.ok, [(o.state, o.reason) for o in res.outcomes]
    one, two = (tmp_path / "r" / f"dd{g}" / "synthetic-16_unet-micro" / "baseline" / "seed0" for g in (1, 2))
    assert json.loads((two / "config.json").read_text())["runtime"][-1]["world_size"] == 2
    a, b = fileio.read_jsonl(one / "evals.jsonl"), fileio.read_jsonl(two / "evals.jsonl")
    assert len(a) == len(b) == 1 and b[0]["value"] == pytest.approx(a[0]["value"], rel=1e-3)
    for x, y in zip(steps(one), steps(two)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)


def signalled_train(run, out_dir, events=None):
    """bench.train.loop.train, logging the step each call starts from to $TRAIN_LOG; a call that starts
    at step 0 sends its own process SIGUSR2 (Slurm's time-limit / pre-emption signal, as submitit's
    local executor forwards it to every task) right after step $SIGNAL_AT, so the signal lands at a
    step fixed in advance, whatever the machine's speed; a resumed call runs to the end."""
    out = Path(out_dir)
    start = fileio.read_json(out / "status.json")["step"] if (out / "checkpoint.pt").exists() else 0
    with open(os.environ["TRAIN_LOG"], "a") as f:
        f.write(f"{start}\n")
    at = int(os.environ["SIGNAL_AT"])

    class Signal(TrainEvents):
        def on_step(self, step, iters, row):
            if step == at:
                os.kill(os.getpid(), signal.SIGUSR2)

    return train(run, out_dir, Signal() if start == 0 else None)


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [1, 2])
def test_a_signalled_submitit_job_checkpoints_at_a_step_requeues_and_resumes_exactly(tmp_path, monkeypatch, tasks):
    """SIGUSR2 mid-run, in every task at the same step: the run checkpoints at that step boundary
    (it has no periodic checkpoint before its end), submitit requeues the job, and the resumed run
    ends bit-for-bit where an uninterrupted one does; with 2 tasks (gpus = 2) the processes agree on
    the step. The signal is sent by the job itself at a fixed step, so nothing depends on the clock."""
    submitit = pytest.importorskip("submitit")
    from bench.suite.executors import train_fn_ref
    from bench.suite.slurm import RunJob

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "starts.log"
    monkeypatch.setenv("TRAIN_LOG", str(log))
    iters = 12
    monkeypatch.setenv("SIGNAL_AT", "5")
    cfg = dict(dataset="synthetic", arch="unet-micro", iters=iters, batch_size=4, ckpt_every=1000, seed=3, gpus=tasks)
    run = {"suite": "s", "workload": "w", "label": "baseline", "seed": 3, "config": cfg}
    if tasks > 1:  # as torchrun's processes below: the same threads, the same float sums
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = submitit.LocalExecutor(folder=str(tmp_path / "sub"))
    # A generous limit that no attempt reaches (the signal comes from the job), so the signal is a
    # pre-emption, not a time-out.
    ex.update_parameters(timeout_min=20, tasks_per_node=tasks)
    job = ex.submit(RunJob(run, str(tmp_path / "parts"), train_fn_ref(signalled_train), False))
    outcome = job.results()[0]  # rank 0's
    assert outcome["state"] == "done" and outcome["step"] == iters
    starts = [int(x) for x in log.read_text().split()]
    assert starts == [0] * tasks + [5] * tasks, starts  # one attempt from 0, one from the signal's step

    if tasks == 1:
        train(TrainConfig(**cfg), tmp_path / "whole")
    else:
        assert cli(2, "train", "--dataset", "synthetic", "--arch", "unet-micro", "--iters", str(iters), "--batch-size", "4",
                   "--ckpt-every", "1000", "--seed", "3", "--out", str(tmp_path / "whole")).returncode == 0
    assert strip_timing(steps(tmp_path / "whole")) == strip_timing(steps(tmp_path / "parts"))
    a, b = state(tmp_path / "whole"), state(tmp_path / "parts")
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)


@pytest.mark.slow
@needs_inception  # its paper run computes an FID
def test_the_gpu_check_runs_to_its_end_on_the_cpu(tmp_path):
    """`python -m bench.gpu_check --device cpu --quick`: every part at toy sizes, each in its own process
    (guards scaled 10x: a loaded machine must not cut a toy part; the guards are tested below)."""
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--guard-scale", "10",
                        "--out", str(out)], capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO), "DIFFBENCH_QUIET": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    settings = {(row["network"], row["setting"]) for row in result["throughput"]}
    assert {("unet-tiny", "fp32 eager"), ("unet-tiny", "fast path"), ("unet-tiny", "fast, channels_last off")} <= settings
    assert all(row["images_per_s"] > 0 and 0 <= row["data_fraction"] < 1 for row in result["throughput"])
    assert result["paper_run"]["fid"] > 0 and result["paper_run"]["runtime"]["device"] == "cpu"
    im = result["imagenet"]
    assert im["state"] == "done" and im["memory_mapped"] is True and im["backend"] == "gloo" and im["processes"] == 2
    assert im["fid"] > 0 and im["resolution"] == 128 and result["cut"] == []
    assert result["checks"]["fast_over_eager_at_least_2x"] is None  # a GPU target: not judged on a CPU
    assert "fast path / fp32 eager" in r.stdout and "ImageNet path: unet-tiny at 128 px, class-conditional" in r.stdout


def test_every_part_of_the_gpu_check_is_bounded(tmp_path):
    """A part past its guard is killed with its whole process group (torchrun's workers too), and a part
    that the spent budget leaves no time for is not started; the check reports both."""
    from bench.tools.gpu_check import Parts
    from bench.tools.gpu_parts import run_bounded

    code, _, _ = run_bounded(["bash", "-c", "sleep 600 & echo $! > child.pid; wait"], 1.0, cwd=tmp_path)
    assert code is None
    child = int((tmp_path / "child.pid").read_text())

    def dead(pid: int) -> bool:  # gone, or a zombie waiting for its (new) parent to reap it
        try:
            return "\tZ" in next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                                 if line.startswith("State:"))
        except FileNotFoundError:
            return True

    # SIGKILL was sent before run_bounded returned; wait on its exit (a pidfd turns readable when the
    # process ends), bounded only to catch a survivor.
    try:
        fd = os.pidfd_open(child)
    except ProcessLookupError:
        fd = None  # already gone and reaped
    if fd is not None:
        import select

        readable, _, _ = select.select([fd], [], [], 60)
        os.close(fd)
        assert readable, "the guard's SIGKILL left the part's child running"
    assert dead(child)
    spent = Parts(tmp_path, budget_s=0)
    assert spent.run("eager", "throughput", 30, arch="unet-tiny") == {"error": "skipped: the check's time budget is spent"}
    assert spent.cut == ["eager"]


def test_the_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cuda"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900)  # catches a hang only
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "gpu_check.json").exists()


def test_parallel_local_workers_spread_over_the_gpus(monkeypatch):
    """`run --jobs N` on a GPU machine: each worker sees the least busy GPUs (CUDA_VISIBLE_DEVICES)."""
    from bench.suite.executors import _GpuPool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pool = _GpuPool()
    a, b, c = pool.take(2), pool.take(2), pool.take(1)
    assert (a, b, c) == ([0, 1], [2, 3], [0])
    pool.give(a)
    assert pool.take(2) == [1, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,9,11")
    assert _GpuPool().take(1) == [5]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1c,GPU-77f0")
    assert _GpuPool().take(1) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _GpuPool().take(1) is None  # no GPU: workers are left alone


def test_shards_partition_the_items_in_rank_order():
    from bench.core.runtime import shard_range

    for n in (0, 1, 7, 37, 64):
        for size in (1, 2, 3, 8):
            parts = [shard_range(n, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))  # every item once, rank order
            assert max(map(len, parts)) == -(-n // size)  # no rank holds more than its block


EVAL_SCRIPT = """
import json, sys, torch
from bench.core.diffusion import make_schedule
from bench.core.runtime import finish_processes, init_processes, is_main
from bench.eval.evaluate import Evaluator
from bench.models.networks import build_model

init_processes(torch.device("cpu"))
torch.manual_seed(0)
model = build_model("unet-micro", 1, 16)
ev = Evaluator({"dataset": "synthetic", "metrics": ["proxy_fd", "proxy_kid"], "num_images": 37, "sampler_steps": 3,
                "save_samples": True, "batch_size": 8})
rows = ev.evaluate(model, make_schedule(), "eps", 1, out_dir=sys.argv[1], noise_sets=2)
if is_main():
    open(sys.argv[1] + "/rows.json", "w").write(json.dumps(rows))
finish_processes()
"""


@pytest.mark.slow
def test_two_ranks_evaluate_what_one_does(tmp_path):
    """Sharded evaluation: 2 processes each sample 19 and 18 of 37 images (by index, so the same noise and
    labels) and gather the features; the metrics and the saved samples equal one process's. Tolerance:
    1e-9 relative on the values (measured: equal), samples equal."""
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT)
    outs = {n: tmp_path / f"n{n}" for n in (1, 2)}
    for n, out in outs.items():
        out.mkdir()
        launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={n}"]
        r = subprocess.run([*launch, str(script), str(out)], capture_output=True, text=True, cwd=REPO,
                           timeout=900)  # catches a hang only
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (json.loads((outs[n] / "rows.json").read_text()) for n in (1, 2))
    assert [r["metric"] for r in one] == [r["metric"] for r in two] == ["proxy_fd", "proxy_kid"]
    for a, b in zip(one, two):
        assert b["value"] == pytest.approx(a["value"], rel=1e-9) and b["noise_sets"] == a["noise_sets"] == 2
    samples = [np.load(outs[n] / "samples" / "step00000001.npz")["arr_0"] for n in (1, 2)]
    assert samples[0].shape == (37, 16, 16, 1) and np.array_equal(*samples)


@pytest.mark.slow
def test_a_two_process_run_evaluates_on_both_ranks_like_one_process(tmp_path):
    """Through `train`: rank 0's EMA is broadcast, both ranks sample their share, rank 0 writes the rows.
    Tolerance: 1e-5 relative (the two runs' weights differ by float sums only, about 4e-6 after 5 steps;
    measured here: 1.0e-6 with the keyed draws, 5e-9 with the earlier ones)."""
    args = [*TINY[:4], "--iters", "4", "--batch-size", "16", "--warmup", "0", "--lr", "1e-3", "--eval-every", "4"]
    for n in (1, 2):
        r = cli(n, "train", *args, "--out", str(tmp_path / f"n{n}"))
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (fileio.read_jsonl(tmp_path / f"n{n}" / "evals.jsonl") for n in (1, 2))
    assert [(r["step"], r["metric"]) for r in two] == [(r["step"], r["metric"]) for r in one] == \
        [(4, "proxy_fd"), (4, "proxy_kid")]
    for a, b in zip(one, two):
        assert b["value"] == pytest.approx(a["value"], rel=1e-5)


SLOW_RANK_SCRIPT = """
import sys, threading, time
from pathlib import Path
from bench.core.config import TrainConfig
from bench.core.runtime import finish_processes, is_main
from bench.eval.evaluate import Evaluator
from bench.train.loop import train

out, LATE_S = Path(sys.argv[1]), 12.0  # twice the collectives' 6 s timeout
calls = {"n": 0}
if is_main():  # rank 0 starts sampling only once rank 1 has been at the meeting point for LATE_S
    real = Evaluator._sample
    def late(self, *args, **kwargs):
        calls["n"] += 1
        marker = out / f"rank1-scoring-{calls['n']}"
        while not marker.exists():  # rank 1 writes it as it goes to gather the features (below)
            threading.Event().wait(0.05)
        arrived = float(marker.read_text())
        threading.Event().wait(max(0.0, arrived + LATE_S - time.monotonic()))  # the lateness under test
        return real(self, *args, **kwargs)
    Evaluator._sample = late
else:  # rank 1 says when it reaches the gather of each evaluation (monotonic time: shared by processes)
    real_score = Evaluator._score
    def scoring(self, images):
        calls["n"] += 1
        (out / f"rank1-scoring-{calls['n']}").write_text(repr(time.monotonic()))
        return real_score(self, images)
    Evaluator._score = scoring
out.mkdir(parents=True, exist_ok=True)
cfg = TrainConfig(dataset="synthetic", arch="unet-tiny", iters=4, batch_size=8, warmup=0, gpus=2, eval_every=2,
                  eval={"metrics": ["proxy_fd"], "num_images": 8, "sampler_steps": 2})
print(train(cfg, out)["state"])
finish_processes()
"""


@pytest.mark.slow
def test_a_rank_that_evaluates_slowly_does_not_time_out_the_others(tmp_path):
    """Collectives time out after 6 s here (DIFFBENCH_DIST_TIMEOUT_MIN=0.1) and, at each of two
    evaluations, rank 0 starts sampling only 12 s after rank 1 arrived at the features' gather (rank 1
    writes when it arrives; the lateness is counted from that, so it exceeds the timeout on any
    machine): rank 1 waits at the store (runtime.meet), not in the gather, and the run ends done
    with both evaluations written."""
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=900,
                       env={**os.environ, "DIFFBENCH_DIST_TIMEOUT_MIN": "0.1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert fileio.read_json(tmp_path / "run" / "status.json")["state"] == "done"
    assert [e["step"] for e in fileio.read_jsonl(tmp_path / "run" / "evals.jsonl")] == [2, 4]


def test_the_backend_follows_the_ranks_gpus():
    """NCCL when every rank has a GPU of its own (by UUID: one GPU per task still reads as distinct),
    gloo on CPUs, and one error line when ranks share a GPU, unless gloo is asked for by name."""
    from bench.core.runtime import choose_backend

    assert choose_backend(["GPU-a", "GPU-b", "GPU-c", "GPU-d"]) == "nccl"
    assert choose_backend(["cpu", "cpu"]) == "gloo"
    assert choose_backend(["GPU-a", "GPU-a"], override="gloo") == "gloo"
    with pytest.raises(ConfigError, match=r"^processes 0, 2 share one GPU \(GPU-a\), which NCCL refuses: .*"
                                          r"DIFFBENCH_DIST_BACKEND=gloo"):
        choose_backend(["GPU-a", "GPU-b", "GPU-a"])
    with pytest.raises(ConfigError, match="^some processes of this run have a GPU and some do not"):
        choose_backend(["GPU-a", "cpu"])
