"""The command line's finish (issue 29 item 5, issue 30's weaknesses): global options after the command,
a compact `list` that starts without torch, the table form in a malformed method entry's error, the cache
and DIFFBENCH_LOG checked before a run writes anything, and a torn evaluation log said on the terminal."""

import argparse
import errno
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import build_parser, main
from bench.listing import WIDTH, arch_rows, dataset_rows, method_rows
from bench.train.resolve import method_table_hint

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--dataset", "synthetic", "--arch", "unet-micro", "--iters", "2", "--batch-size", "4",
         "--eval-every", "2", "--eval-images", "8", "--device", "cpu"]


def one_error_line(capsys, code: int) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.err
    return lines[0]


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# --- global options after the command ---------------------------------------------------------------

def test_global_options_parse_after_the_command_as_before_it():
    before = build_parser().parse_args(["--results", "R", "--log", "wandb", "--plugins", "a", "run", "mini"])
    after = build_parser().parse_args(["run", "mini", "--results", "R", "--log", "wandb", "--plugins", "a"])
    assert (after.results, after.log, after.plugins) == (before.results, before.log, before.plugins)
    assert (after.results, after.log, after.plugins) == ("R", "wandb", ["a"])
    assert not any(k.endswith("_after") for k in vars(after))
    # Both places: the one after wins, and --plugins adds up.
    both = build_parser().parse_args(["--results", "A", "--plugins", "p", "list", "--results", "B", "--plugins", "q"])
    assert (both.results, both.plugins, both.log) == ("B", ["p", "q"], None)
    plain = build_parser().parse_args(["list"])
    assert plain.results == str(REPO / "results") and plain.plugins == [] and plain.log is None


def test_every_command_help_lists_the_global_options():
    subs = commands(build_parser())
    assert {"list", "run", "train", "report", "prepare", "posthoc-ema"} <= set(subs)
    for name, p in subs.items():
        text = p.format_help()
        for flag in ("--plugins PATH", "--results DIR", "--log {tensorboard,wandb}"):
            assert flag in text, f"{name} --help lacks {flag}"


def test_results_after_the_command_is_the_one_used(tmp_path, capsys):
    line = one_error_line(capsys, main(["report", "nosuite", "--results", str(tmp_path / "elsewhere")]))
    assert str(tmp_path / "elsewhere" / "nosuite") in line


# --- list ---------------------------------------------------------------------------------------------

def test_list_is_one_short_line_per_entry_and_starts_without_torch():
    """`run_bench.py list` as a user runs it, in a fresh interpreter: every line fits 80 columns, every
    method, suite, dataset and architecture is on one, and torch is never imported (its import is most of
    the 3-10 s the full tables take)."""
    code = ("import runpy, sys\n"
            "sys.argv = ['run_bench.py', 'list']\n"
            "try:\n    runpy.run_path('run_bench.py', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "no torch"
    lines = lines[:-1]
    assert max(len(line) for line in lines) <= WIDTH
    names = [line.split()[0] for line in lines if line.startswith("  ")]
    suites = sorted(p.stem for p in (REPO / "suites").glob("*.toml"))
    for name in ("baseline", "clts", "power_ema", "mini", "smoke", "fashion-mnist", "unet-micro", "dit-xl/2", *suites):
        assert name in names, name
    entries = len(method_rows(sorted((REPO / "methods").glob("*.py")))) + len(suites) + \
        len(dataset_rows(REPO / "datasets")) + len(arch_rows(REPO / "bench" / "models" / "networks.py"))
    assert len(names) == entries  # one line each


def test_the_compact_list_reads_what_the_registries_hold():
    """The text reading (no imports) against the registries the runs use, on the built-ins."""
    from bench.core.registry import load_plugins
    from bench.data.loading import registry
    from bench.models.networks import ARCHS

    methods = dict(method_rows(sorted(p for p in (REPO / "methods").glob("*.py") if not p.name.startswith("_"))))
    # the built-ins (other tests of this process may have registered plugins of their own)
    assert set(methods) == {n for n, cls in load_plugins().items() if Path(inspect.getfile(cls)).parent == REPO / "methods"}
    assert methods["clts"] == "Curriculum timestep schedule (Xu et al. 2024)"
    assert methods["debiased"] == "Debiased weighting (Yu et al. 2024)"  # the citation's code reference dropped
    data = {name: (size, source) for name, size, source in dataset_rows(REPO / "datasets")}
    assert {n: s for n, (_, s) in data.items()} == {n: m.SOURCE for n, m in registry().items()}
    assert data["fashion-mnist"][0] == "1 ch, 28 px" and data["folder"][0] == "3 ch, any px"
    assert arch_rows(REPO / "bench" / "models" / "networks.py") == [(n, doc) for n, (_, doc) in ARCHS.items()]


def test_list_long_has_the_hyperparameters_and_a_plugin_is_listed(tmp_path, capsys):
    assert main(["list", "--long"]) == 0
    out = capsys.readouterr().out
    assert "mu = 0.3" in out and "Suites" in out and "unet-micro" in out and "ch=16" in out
    plugin = tmp_path / "mine.py"
    plugin.write_text('from bench.core.spec import Method\n\n\nclass Mine(Method):\n'
                      '    """My weighting (Me 2026; me/repo loss.py): w = 1."""\n\n    name = "mine_method"\n')
    assert main(["list", "--plugins", str(plugin)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  mine_method   My weighting (Me 2026)" in lines
    assert sum("mine_method" in line for line in lines) == 1 and max(map(len, lines)) <= WIDTH


# --- a method entry with its hyperparameters in the name ---------------------------------------------

SUITE = """[suite]
name = "{name}"
[grid]
methods = [{methods}]
datasets = ["synthetic"]
archs = ["unet-micro"]
seeds = [0]
[budget]
iters = 2
batch_size = 4
[eval]
every = 2
metrics = ["proxy_fd"]
num_images = 8
"""


def test_a_method_entry_with_hyperparameters_in_its_name_shows_the_table_form(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE.format(name="s", methods='"min_snr gamma=5"'))
    line = one_error_line(capsys, main(["--results", str(tmp_path / "res"), "run", str(suite), "--dry-run"]))
    assert "grid.methods[0]" in line and 'methods = [{ name = "min_snr", gamma = 5 }]' in line
    assert not (tmp_path / "res").exists()
    # The table it shows is one the suite loads.
    suite.write_text(SUITE.format(name="s", methods='{ name = "min_snr", gamma = 5 }'))
    assert main(["--results", str(tmp_path / "res"), "run", str(suite), "--dry-run"]) == 0


@pytest.mark.parametrize("entry,table", [
    ("laplace b=1", 'name = "laplace", b = 1'),
    ("laplace b = 1.5, mode=fast", 'name = "laplace", b = 1.5, mode = "fast"'),
    ("min_snr(gamma=5)", 'name = "min_snr", gamma = 5'),
    ("x flag=true", 'name = "x", flag = true'),
])
def test_the_table_form_of_a_method_entry(entry, table):
    assert f"methods = [{{ {table} }}]" in method_table_hint(entry)


@pytest.mark.parametrize("entry", ["clts", "no_such_method", "=1", ""])
def test_an_entry_without_hyperparameters_gets_no_table_hint(entry):
    assert method_table_hint(entry) == ""


# --- the cache and DIFFBENCH_LOG, checked before a run writes anything -------------------------------

def test_a_cache_that_is_a_file_is_named_before_anything_is_written(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cachefile"
    cache.write_text("")
    monkeypatch.setenv("DIFFBENCH_CACHE", str(cache))
    line = one_error_line(capsys, main(["--results", str(tmp_path / "res"), *TRAIN]))
    assert f"DIFFBENCH_CACHE={cache}" in line and f"{cache} is a file" in line
    assert "point DIFFBENCH_CACHE at a writable folder" in line
    assert not (tmp_path / "res").exists()


def test_a_home_that_cannot_hold_the_default_cache_is_named_before_anything_is_written(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("")  # a file: nothing can be made under it, whoever runs the test (root included)
    monkeypatch.delenv("DIFFBENCH_CACHE")
    monkeypatch.setenv("HOME", str(home))
    line = one_error_line(capsys, main(["--results", str(tmp_path / "res"), *TRAIN]))
    assert f"HOME={home}" in line and "set DIFFBENCH_CACHE to a writable folder" in line
    assert not (tmp_path / "res").exists()


def test_an_unknown_diffbench_log_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFBENCH_LOG", "garbage")
    line = one_error_line(capsys, main(["--results", str(tmp_path / "res"), *TRAIN]))
    assert "unknown DIFFBENCH_LOG 'garbage'" in line and "unset DIFFBENCH_LOG" in line
    assert not (tmp_path / "res").exists()
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE.format(name="s", methods='"baseline"'))
    line = one_error_line(capsys, main(["--results", str(tmp_path / "res"), "run", str(suite)]))
    assert "unknown DIFFBENCH_LOG 'garbage'" in line and not (tmp_path / "res").exists()


def test_a_file_system_error_in_the_cache_names_the_cache(tmp_path, monkeypatch, capsys):
    import bench.cli

    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))

    def refused(path):
        def cmd(args):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return cmd

    monkeypatch.setattr(bench.cli, "cmd_report", refused(tmp_path / "cache" / "eval" / "fid_stats" / "x.npz"))
    line = one_error_line(capsys, main(["report", "mini"]))
    assert f"DIFFBENCH_CACHE={tmp_path / 'cache'}" in line and "point DIFFBENCH_CACHE at a writable folder" in line
    monkeypatch.setattr(bench.cli, "cmd_report", refused(tmp_path / "elsewhere" / "x"))
    line = one_error_line(capsys, main(["report", "mini"]))
    assert "free space or fix the path" in line and "DIFFBENCH_CACHE" not in line


# --- a torn evaluation log, on the terminal too ------------------------------------------------------

def test_a_torn_evaluation_line_is_said_on_the_terminal(tmp_path, capsys):
    from test_report import WORKLOAD, write_run

    root = tmp_path / "demo"
    for seed in (0, 1):
        write_run(root, "baseline", seed)
        write_run(root, "fast", seed)
    cut = root / WORKLOAD / "fast" / "seed1" / "evals.jsonl"
    cut.write_text(cut.read_text()[:-30])  # the final row torn
    assert main(["--results", str(tmp_path), "report", "demo"]) == 0
    err = capsys.readouterr().err
    assert f"{WORKLOAD}/fast/seed1: evals.jsonl line 4 is unreadable (cut short)" in err
    assert "baseline/seed" not in err  # the whole runs are not named


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`run_bench.py list | head -2`: the pipe closes before the listing ends; the command ends quietly
    with 0 instead of an "error: Broken pipe ... free space" line. The pipe's read end is closed before
    the command starts, so its first write fails whatever the machine's speed."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "run_bench.py", "list"], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr, r.stderr
