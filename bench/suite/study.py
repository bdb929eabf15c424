"""Whether a suite is the study its results folder holds (results/<suite>/suite.json), and whether the
suite file changed since `run` wrote that record.

A study is what makes its runs comparable: the budget, the [train] settings, the [eval] protocol and
the data sets. Its grid may grow or shrink (a seed or a method added runs alone, one removed is left
out by the report); anything else under the same name is another study, and `run` refuses to merge
it (:func:`check_same_study`). `report` reads suite.json, not the suite file: :func:`suite_file_drift`
says in one line when the file now says something else.

Torch-free but for the defaults of [train] (a run's TrainConfig), read when two records are compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from bench import fileio
from bench.errors import ConfigError
from bench.eval.spec import DEFAULTS as EVAL_DEFAULTS
from bench.train.run_folder import EVAL_OUTPUT_KEYS, ResultsConflictError

#: [train] keys that do not change what a run measures: where it runs and with which files (a plugin's
#: code is checked per run by its SHA-256, wherever the file lies)
HOW_KEYS = ("plugins",)


def study_of(info: dict) -> dict[str, object]:
    """A suite record's study, flat: "[budget] iters", "[train] lr", "[eval] num_images", "[grid] datasets"."""
    info = json.loads(fileio.dumps(info))  # one representation for both sides (tuples are lists)
    budget = info.get("budget") or {}
    out: dict[str, object] = {f"[budget] {k}": budget[k] for k in ("iters", "batch_size", "baseline_extend")
                              if k in budget}
    out.update({f"[train] {k}": v for k, v in (info.get("train") or {}).items() if k not in HOW_KEYS})
    out.update({f"[eval] {k}": v for k, v in (info.get("eval") or {}).items() if k not in EVAL_OUTPUT_KEYS})
    if info.get("workloads") is not None:
        out["[grid] datasets"] = sorted({f"{w.get('dataset')} at {w.get('resolution')} px" for w in info["workloads"]})
    return out


def study_differences(old: dict, new: dict) -> list[str]:
    """How two suite records' studies differ, one "key: old there, new now" each; a key one record
    leaves unset stands for its default (a record that has no budget or datasets at all is older: those
    are not compared)."""
    # torch on first use: [train]'s defaults are a TrainConfig's (the runner has torch loaded by now)
    from bench.core.config import RUNTIME_KEYS, TrainConfig

    defaults = {f"[train] {k}": v for k, v in json.loads(fileio.dumps(TrainConfig().to_dict())).items()}
    defaults.update({f"[eval] {k}": v for k, v in json.loads(fileio.dumps(EVAL_DEFAULTS)).items()})
    a, b = study_of(old), study_of(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.removeprefix("[train] ") in RUNTIME_KEYS or (key not in defaults and not (key in a and key in b)):
            continue
        there, now = a.get(key, defaults.get(key)), b.get(key, defaults.get(key))
        if there != now:
            out.append(f"{key}: {_short(there)} there, {_short(now)} now")
    return out


def check_same_study(suite_json: Path, new: dict) -> None:
    """Refuse, before anything runs, a suite whose name's results folder holds another study."""
    try:
        old = fileio.read_json(suite_json)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{suite_json} cannot be read ({exc}); delete it (`run` writes it again) or pass "
                          "another --results folder") from None
    diffs = study_differences(old, new) if isinstance(old, dict) else ["not a suite record"]
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ResultsConflictError(
            f"{suite_json.parent} holds the results of another study named {new.get('name')!r} "
            f"({'; '.join(diffs[:3])}{more}); refusing to merge them: rename this suite ([suite] name) or pass "
            "another --results folder")


def suite_file_drift(info: dict) -> str | None:
    """One line when the suite file the runs were made with (suite.json's `file`) now says something
    else than it did then (suite.json's `source_text`), naming what; None when it is the same, gone,
    or the record is older than those fields."""
    path, then = info.get("file"), info.get("source_text")
    if not path or not then or not Path(path).is_file():
        return None
    try:
        now_text = Path(path).read_text(encoding="utf-8")
        before, now = _flat(tomllib.loads(then)), _flat(tomllib.loads(now_text))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return f"the suite file {path} no longer reads as the one the runs were made with ({exc})"
    diffs = [f"{k}: {_short(before.get(k, '(unset)'))} then, {_short(now.get(k, '(unset)'))} now"
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if not diffs:
        return None
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return (f"the suite file {path} changed since the runs ({'; '.join(diffs[:3])}{more}); this report shows the "
            "suite as run (suite.json): `run` it again to apply the change")


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    """A TOML document's settings as {"[table] key": value}."""
    out: dict[str, object] = {}
    for k, v in data.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"[{k}] "))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."
