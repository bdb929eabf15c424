"""`run_bench.py ref-stats TARGET`: the reference statistics (and noise floors) of a suite's
evaluations, or of one dataset's, computed once before the training jobs need them."""

import sys
from pathlib import Path

from bench.data.loading import registry
from bench.errors import ConfigError
from bench.eval.reference import prepare_references
from bench.suite.grid import SUITES_DIR, available_suites, load_suite
from bench.train.resolve import resolve_run


def ref_stats_command(args) -> None:
    """Reference statistics (and noise floors) of a suite's evaluations, or of one dataset's."""
    target = Path(args.target)
    if target.suffix == ".toml" or target.is_file() or (SUITES_DIR / f"{args.target}.toml").is_file():
        suite = load_suite(args.target, plugins=getattr(args, "plugins", None))
        specs = [resolve_run(r.config, where=f"run {r.key}").eval_spec for r in suite.runs()]
        if not any(specs):
            raise ConfigError(f"suite {suite.name} evaluates nothing: it has no reference statistics to compute")
    elif args.target not in registry():
        raise ConfigError(f"ref-stats: {args.target!r} is neither a suite ({', '.join(available_suites())}, or a .toml "
                          f"file) nor a dataset ({', '.join(sorted(registry()))})")
    else:
        spec = {"dataset": args.target, "data_dir": args.data_dir, "resolution": args.resolution,
                "metrics": args.metrics, "num_ref": _num_ref(args.num_ref), "ref_split": args.ref_split,
                "num_images": args.num_images, "fid_mode": args.fid_mode}
        specs = [{k: v for k, v in spec.items() if v is not None or k in ("data_dir", "resolution")}]
    rows = prepare_references(specs, device=None if args.device == "auto" else args.device, workers=args.workers,
                              say=lambda m: print(m, file=sys.stderr))
    for r in rows:
        how = "cached" if r["cached"] else f"computed in {r['seconds']} s"
        print(f"{r['dataset']} {r['split']} {r['resolution']} px: {r['num_ref']:,} reference images, {r['extractor']}: "
              f"ref_sha256 {r['ref_sha256']} ({how}); noise floor at N = {r['num_images']:,}: {r['floor']}")


def _num_ref(value: str | None):
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--num-ref {value!r} is neither a number nor \"all\"") from None


