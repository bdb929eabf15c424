"""Where and how a run executes: its device, the GPU fast path, and its processes (torchrun / DDP).

None of this changes what a run *is* (its config, data, timesteps, noise, method): it is
resolved in the process that trains, so a run started on a GPU can resume on a CPU and back.

Device: ``device = "auto"`` is CUDA when torch sees a GPU, else the CPU; ``"cuda"`` where there is
none is a :class:`~bench.errors.ConfigError`. A torchrun rank uses GPU ``LOCAL_RANK`` (modulo the
GPUs it sees, so two processes can share one GPU in a test).

Fast path, each part recorded in config.json's ``runtime`` list and the report:

- ``precision = "auto"``: bf16 autocast of the network's forward (and so its backward) on a CUDA
  GPU with native bf16 (Ampere and later), else fp32. Weights, optimizer state, EMA, the loss reduction and the method's weights
  stay fp32 (the network's output is cast back to fp32 before the loss).
- ``tf32`` (default true): TF32 matmuls and convolutions, CUDA only.
- ``fused_adamw`` (default true): the fused AdamW kernel, CUDA only (the CPU uses foreach).
- ``channels_last`` (default "auto": by network and device, :data:`CHANNELS_LAST_CUDA`; on the CPU
  on, as before): NHWC memory layout for the convolutional networks.
- ``compile`` (default false): torch.compile of the network for training steps only (the EMA
  and evaluation use the plain module).

Processes: ``gpus = N`` runs N processes (one per GPU; gloo processes on a CPU), started by
torchrun (``torchrun --nproc_per_node N run_bench.py train ...``; the suite runner and the Slurm
path start them for you). Backend: NCCL when every rank has a GPU of its own (compared by UUID),
gloo on CPUs, and an error when ranks share a GPU unless ``DIFFBENCH_DIST_BACKEND=gloo`` asks for
gloo by name (``DIFFBENCH_DIST_BACKEND`` overrides the choice). ``DIFFBENCH_DIST_TIMEOUT_MIN``
(default 180) bounds a collective; ranks that may be far apart (evaluation, checkpoints) first meet through the
rendezvous store (:func:`meet`, bounded by ``DIFFBENCH_WAIT_MIN``, default 720), so no rank waits
inside a collective for another that is still working.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from bench.core.config import check_device_name
from bench.errors import ConfigError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device a setting names on this machine; one ConfigError line when it cannot be had."""
    why = check_device_name(name)
    if why:
        raise ConfigError(f"device {name!r} {why}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        fix = ("check the driver and CUDA_VISIBLE_DEVICES" if torch.version.cuda else
               "install a CUDA build of torch (DIFFBENCH_TORCH=... ./setup.sh)")
        raise ConfigError(f"device {name!r} asks for a CUDA GPU, but torch {torch.__version__} sees none; "
                          f"use --device cpu or auto, or {fix}")
    count = torch.cuda.device_count()
    index = int(name[5:]) if name.startswith("cuda:") else local_rank % count
    if index >= count:
        raise ConfigError(f"device {name!r}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


# -- processes --------------------------------------------------------------------------------------


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process, from torchrun's (or Slurm's) environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return world()[0] == 0


def gpu_id(device: torch.device) -> str:
    """What identifies this process's device across processes: the GPU's UUID (the same GPU seen
    through different CUDA_VISIBLE_DEVICES has one UUID), or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return str(torch.cuda.get_device_properties(device).uuid)


def choose_backend(ids: list[str], override: str | None = None) -> str:
    """The process group's backend from every rank's device id (gpu_id): NCCL when each rank has a
    GPU of its own, gloo on CPUs. Ranks that share a GPU (NCCL refuses them) are an error unless
    gloo is asked for by name (DIFFBENCH_DIST_BACKEND=gloo: slow, fine for a check)."""
    if override:
        return override
    if all(i == "cpu" for i in ids):
        return "gloo"
    if "cpu" in ids:
        raise ConfigError("some processes of this run have a GPU and some do not; give every process its own GPU "
                          "(or run on CPUs alone with --device cpu)")
    shared = sorted({i for i in ids if ids.count(i) > 1})
    if shared:
        ranks = [r for r, i in enumerate(ids) if i == shared[0]]
        raise ConfigError(f"processes {', '.join(map(str, ranks))} share one GPU ({shared[0]}), which NCCL refuses: "
                          "give each process its own GPU (check CUDA_VISIBLE_DEVICES and the job's GPU binding), or "
                          "set DIFFBENCH_DIST_BACKEND=gloo for a slow check")
    return "nccl"


def init_processes(device: torch.device) -> str | None:
    """Join the process group of a multi-process run (once per process); its backend, or None alone.
    The ranks first tell each other their GPUs' UUIDs through the rendezvous store (torchrun's or
    submitit's MASTER_ADDR:MASTER_PORT), so the backend follows the GPUs they have, not how many
    this process happens to see (one per task on clusters that bind GPUs to tasks)."""
    rank, size, _ = world()
    if size == 1:
        return None
    if dist.is_initialized():
        return dist.get_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=float(os.environ.get("DIFFBENCH_DIST_TIMEOUT_MIN", 180)))
    wait = datetime.timedelta(minutes=float(os.environ.get("DIFFBENCH_WAIT_MIN", 720)))  # for ranks that start late
    store, rank, size = next(dist.rendezvous("env://", rank, size, timeout=wait))
    prefix = f"diffbench/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # a restarted group starts anew
    store.set(f"{prefix}/gpu/{rank}", gpu_id(device))
    keys = [f"{prefix}/gpu/{r}" for r in range(size)]
    store.wait(keys, wait)
    backend = choose_backend([store.get(k).decode() for k in keys], os.environ.get("DIFFBENCH_DIST_BACKEND"))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    _MEET.update(store=store, prefix=prefix, count=0)
    return backend


@contextlib.contextmanager
def full_fp32(allow_tf32: bool = False):
    """No TF32 inside (feature extractors in plain fp32, like on a CPU), unless `allow_tf32`."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


SAMPLE_PRECISIONS = ("fp32", "tf32", "bf16")


def sample_precision(name: str | None, device: torch.device) -> str:
    """The precision an evaluation samples in on `device`: `name`, or the field's default, TF32 on a
    CUDA GPU (DiT's sampler) and fp32 elsewhere. TF32 exists on CUDA alone: on a CPU it is fp32."""
    name = name or ("tf32" if device.type == "cuda" else "fp32")
    return "fp32" if name == "tf32" and device.type != "cuda" else name


@contextlib.contextmanager
def sampling_in(precision: str, device: torch.device):
    """The network's forward passes inside run in `precision` (sample_precision's name): plain fp32,
    TF32 matmuls and convolutions, or bf16 autocast (the sampler's own arithmetic stays fp32)."""
    with full_fp32(allow_tf32=precision == "tf32"):
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield


def finish_processes() -> None:
    """Leave the process group (end of a multi-process command)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _MEET.update(store=None, count=0)


_MEET = {"store": None, "prefix": "", "count": 0}


def meet() -> None:
    """Wait until every rank of the run reaches this point, through the rendezvous store rather than a
    collective: a rank that is far behind (rank 0 preparing reference statistics, writing samples,
    an uneven share of an evaluation) is waited for up to DIFFBENCH_WAIT_MIN minutes (default 720),
    never up to a collective's timeout (DIFFBENCH_DIST_TIMEOUT_MIN), which would end the job. Every
    rank calls it at the same points, in the same order."""
    store = _MEET["store"]
    if store is None or not dist.is_initialized():
        return
    n, rank, size = _MEET["count"], dist.get_rank(), dist.get_world_size()
    _MEET["count"] += 1
    store.set(f"{_MEET['prefix']}/meet/{n}/{rank}", "1")
    wait = datetime.timedelta(minutes=float(os.environ.get("DIFFBENCH_WAIT_MIN", 720)))
    store.wait([f"{_MEET['prefix']}/meet/{n}/{r}" for r in range(size)], wait)


def barrier() -> None:
    """Every rank here (met through the store first, so no rank waits long inside the collective)."""
    if dist.is_initialized():
        meet()
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (a decision every rank must share)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_slices(local: torch.Tensor) -> torch.Tensor:
    """The global batch's values from each rank's equal slice, in rank order, on every rank.

    An all_reduce of zero-padded slices rather than all_gather: gloo reduces CUDA tensors but
    does not gather them, and two ranks sharing one GPU need gloo."""
    if not dist.is_initialized():
        return local
    rank, size = dist.get_rank(), dist.get_world_size()
    n = local.shape[0]
    out = torch.zeros((n * size, *local.shape[1:]), dtype=local.dtype, device=local.device)
    out[rank * n:(rank + 1) * n] = local
    dist.all_reduce(out)
    return out


def shard_range(n: int, rank: int, size: int) -> range:
    """Rank `rank` of `size`'s contiguous share of items 0..n-1: the rank-th block of ceil(n / size)
    (the last ranks' may be shorter or empty); the shares partition 0..n-1 in rank order."""
    block = -(-n // size)
    return range(min(n, rank * block), min(n, (rank + 1) * block))


def shard(n: int) -> range:
    """This process's share of items 0..n-1 (all of them in a single process)."""
    if not dist.is_initialized():
        return range(n)
    return shard_range(n, dist.get_rank(), dist.get_world_size())


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers in every rank's copy of `module` (the EMA, which rank 0 alone
    keeps, before every rank samples its share of an evaluation)."""
    if not dist.is_initialized():
        return
    meet()  # rank 0 may still be writing the previous checkpoint or log
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank); the ranks meet first (an evaluation's shares
    can finish far apart)."""
    if not dist.is_initialized():
        return [obj]
    meet()
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- the fast path ----------------------------------------------------------------------------------

# channels_last = "auto" on a CUDA GPU, by network, from measurement: the GPU check's channels_last
# rows (the fast path with it on, over off) decide an entry. None is measured yet (no GPU has been
# lent), so every network is off: CUDA's GroupNorm takes NCHW only, so each of the U-Nets' norms (51 in
# ddpm-unet, 87 in adm-unet) converts NHWC activations in and back out, and DiT has a single
# convolution (its patch embedding) to gain from NHWC. Turn an entry on when the check measures it
# faster. On the CPU, "auto" is on for every network: every committed CPU result was trained so, and
# the layout changes a run's floating point.
CHANNELS_LAST_CUDA = {
    "unet-micro": False, "unet-tiny": False, "ddpm-unet": False, "adm-unet": False,
    "dit-s/2": False, "dit-s/4": False, "dit-s/8": False, "dit-b/2": False, "dit-b/4": False, "dit-b/8": False,
    "dit-l/2": False, "dit-l/4": False, "dit-l/8": False, "dit-xl/2": False, "dit-xl/4": False, "dit-xl/8": False,
}


def channels_last_for(arch: str, device: torch.device, setting: bool | str = "auto") -> bool:
    """Whether a run of `arch` on `device` trains in channels_last: `setting` when it is a flag, else
    (auto) on for the CPU and CHANNELS_LAST_CUDA's entry on a GPU (off for a network it lacks)."""
    if isinstance(setting, bool):
        return setting
    return device.type != "cuda" or CHANNELS_LAST_CUDA.get(arch, False)



@dataclass(frozen=True)
class Runtime:
    """How this process trains a run (resolved from its TrainConfig on this machine)."""

    device: str          # "cpu", "cuda:0", ...
    device_name: str     # the GPU's or the CPU's name
    precision: str       # "fp32" or "bf16" (autocast of the network)
    tf32: bool
    channels_last: bool
    fused_adamw: bool
    compile: bool
    world_size: int
    rank: int
    backend: str | None  # "nccl", "gloo", or None (one process)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def autocast(self):
        """The network's forward under bf16 autocast, or nothing."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=torch.bfloat16)

    def record(self, from_step: int) -> dict:
        """This process's settings, for config.json's ``runtime`` list (rank omitted: every rank is alike)."""
        d = asdict(self)
        d.pop("rank")
        return {"from_step": from_step, **d}


def make_runtime(cfg) -> Runtime:
    """Resolve a TrainConfig's device, fast path and processes here; join the process group.

    Raises one ConfigError line when the machine cannot do what the config asks (no GPU, a
    process count that differs from `gpus`)."""
    rank, size, local_rank = world()
    if size != cfg.gpus:
        how = (f"launch it with `torchrun --nproc_per_node {cfg.gpus} run_bench.py train ...` "
               "(a suite's runner does this for you)") if cfg.gpus > 1 else "run it as one process (without torchrun)"
        raise ConfigError(f"gpus={cfg.gpus} asks for {cfg.gpus} process(es), but this is {size}: {how}")
    device = resolve_device(cfg.device, local_rank)
    cuda = device.type == "cuda"
    # auto: bf16 where the GPU has it natively (Ampere and later); emulated bf16 is slower than fp32
    native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if native_bf16 else "fp32")
    if precision == "bf16" and not native_bf16 and rank == 0:  # asked for, not chosen by auto
        import sys

        print(f"warning: bf16 on {device} is emulated and much slower than fp32 (9x on this project's 2-core CPU "
              "in one measurement); --precision auto picks fp32 here", file=sys.stderr)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    backend = init_processes(device)
    return Runtime(device=str(device), device_name=name, precision=precision, tf32=cuda and cfg.tf32,
                   channels_last=channels_last_for(cfg.arch, device, cfg.channels_last),
                   fused_adamw=cuda and cfg.fused_adamw, compile=cfg.compile, world_size=size, rank=rank,
                   backend=backend)


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- stopping at a step boundary (Slurm time limits and pre-emption) ----------------------------------


class StopRequested(BaseException):
    """Training stopped at a step boundary because a signal asked it to; the run's checkpoint is at
    `step`. A BaseException, so that no ``except Exception`` records it as a failure."""

    def __init__(self, step: int):
        super().__init__(f"stopped by a signal at step {step}; the checkpoint is at that step")
        self.step = step


_STOP = {"watching": False, "requested": False, "deferrable": False, "previous": None, "signum": None}


def watch_stop_signal(signum: int):
    """From now on, signal `signum` asks training to checkpoint at the next step boundary and raise
    :class:`StopRequested`, while the training loop is stepping (:func:`stepping`); at any other
    time (setup, evaluation) the previous handler acts at once, as before. Returns that handler."""
    import signal

    def ask(_signum, frame):
        if _STOP["deferrable"]:
            _STOP["requested"] = True
        elif callable(_STOP["previous"]):
            _STOP["previous"](_signum, frame)

    _STOP.update(watching=True, requested=False, deferrable=False, previous=signal.getsignal(signum), signum=signum)
    signal.signal(signum, ask)
    return _STOP["previous"]


def unwatch_stop_signal(signum: int, previous) -> None:
    """Give `signum` back to `previous` (what watch_stop_signal returned)."""
    import signal

    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _STOP.update(watching=False, requested=False, deferrable=False, previous=None)


def stepping(on: bool) -> None:
    """Whether the training loop will reach a step boundary soon (a watched signal can wait for it).
    Turned off (an evaluation begins) while a signal waits that no boundary has taken up: the previous
    handler acts now, as for a signal during the evaluation, which could outlast the signal's warning."""
    _STOP["deferrable"] = on
    if not on and _STOP["requested"] and callable(_STOP["previous"]):
        _STOP["requested"] = False
        _STOP["previous"](_STOP["signum"], None)


def stop_requested(device: torch.device) -> bool:
    """Whether a watched signal came (in any process of the run: they stop at the same step).
    Costs nothing unless a signal is watched; then one tiny all_reduce per step with N processes."""
    if not _STOP["watching"]:
        return False
    flag = _STOP["requested"]
    if dist.is_initialized():
        box = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        flag = bool(box.item())
    if flag:  # taken up: this boundary checkpoints and stops
        _STOP["requested"] = False
    return flag
