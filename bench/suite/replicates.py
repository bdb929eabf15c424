"""Independent replicates: a study's seeds that another suite also trains on the same workload are not
independent of that suite's runs (seed k fixes the initialisation, data order, timestep draws and
noise: bench/train/state.py), so agreement between the two is not independent evidence. `run
--dry-run` and the report name every other suite in suites/ that shares seeds with this one on one of
its workloads; only a study that shares none may call a reading it repeats "supported beyond this run".

A workload is matched by (dataset, resolution as the file gives it, architecture): a suite that leaves
the resolution at the dataset's own is matched only with another that does too (reading the native
resolution needs the data set's loader, which imports torch). The other suites' [grid] and [tune]
seeds both count. Reads TOML only, no torch.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

from bench.suite.grid import SUITES_DIR


def shared_seeds(name: str, workloads: list[dict], seeds, suites_dir: Path = SUITES_DIR) -> list[tuple[str, str, list[int]]]:
    """(other suite, workload, shared seeds) for every other suite file in `suites_dir` that trains one of
    `workloads` (dicts with name, dataset, resolution, arch) on some of `seeds`."""
    mine = {(w.get("dataset"), w.get("resolution"), w.get("arch")): w.get("name") for w in workloads}
    out = []
    for path in sorted(Path(suites_dir).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue  # not a suite that can run, so none of its seeds were trained
        head, grid = data.get("suite") or {}, data.get("grid") or {}
        other = head.get("name") or path.stem
        if other == name or not isinstance(grid, dict):
            continue
        used = {s for s in list(grid.get("seeds") or []) + list((data.get("tune") or {}).get("seeds") or [])
                if isinstance(s, int)}
        common = sorted(used & set(seeds))
        for d in grid.get("datasets") or []:
            d = {"name": d} if isinstance(d, str) else d
            for arch in grid.get("archs") or []:
                w = mine.get((d.get("name"), d.get("resolution"), arch)) if isinstance(d, dict) else None
                if w and common:
                    out.append((other, w, common))
    return out


def _seed_list(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)) \
        else ", ".join(map(str, seeds))


def replicate_lines(name: str, workloads: list[dict], seeds, suites_dir: Path = SUITES_DIR) -> list[str]:
    """One paragraph: which suites share seeds with this one, or that none does."""
    shared = shared_seeds(name, workloads, seeds, suites_dir)
    if not shared:
        return [f"Independent replicates: no other suite in {Path(suites_dir).name}/ trains this study's workloads on "
                f"its seeds ({_seed_list(sorted(seeds))}), so its runs start from initialisations and data orders of "
                "their own: a reading of an earlier study that this one repeats is supported beyond this run."]
    where = "; ".join(f"`{other}` on {w} (seeds {_seed_list(s)})" for other, w, s in shared)
    return [f"**Not independent replicates**: other suites train the same workload on some of this study's seeds: "
            f"{where}. Those runs share initialisations, data order, timestep draws and noise with this study's, "
            "so where the two agree the agreement is not independent evidence (give a study seeds that no other "
            "suite uses to make it a replicate)."]
