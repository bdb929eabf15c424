"""The documentation works as written: every command in README.md and docs/ parses, every relative link
and #anchor resolves, and the tutorial's plugin and every suite example load."""

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from bench.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def _split(text: str) -> tuple[list[tuple[str, str]], list[str], str]:
    """(fenced blocks as (language, code), indented code lines, the prose with code blocks blanked)."""
    fenced = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    indented = [line[4:] for line in prose.split("\n") if line.startswith("    ") and line.strip()]
    prose = "\n".join("" if line.startswith("    ") else line for line in prose.split("\n"))
    return fenced, indented, prose


def _inline_code(prose: str) -> list[str]:
    """Inline code spans, a span broken over lines read as one line."""
    return [" ".join(m.split()) for m in re.findall(r"`([^`]+)`", prose)]


def _command(words: list[str]) -> tuple[str, list[str]] | None:
    """("cli", the words after run_bench.py / diffbench) or ("module", [module, *args]) or None."""
    if not words:
        return None
    head = Path(words[0]).name
    if head == "diffbench":
        return "cli", words[1:]
    if "run_bench.py" in {Path(w).name for w in words[:4]} and head in ("run_bench.py", "python", "python3",
                                                                          "torchrun"):
        return "cli", words[[Path(w).name for w in words].index("run_bench.py") + 1:]
    if head in ("python", "python3") and words[1:2] == ["-m"] and words[2].split(".")[0] == "bench":
        return "module", words[2:]
    return None


def commands() -> list[tuple[str, str, str, list[str]]]:
    """(page, the command as written, kind, words) of every command in the pages."""
    found = []
    for page in PAGES:
        fenced, indented, prose = _split(page.read_text())
        lines = indented + [line for lang, code in fenced if lang in ("", "sh", "bash", "shell")
                            for line in code.split("\n")]
        for line in lines + _inline_code(prose):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # a span that is not a command (an unbalanced quote in prose)
                continue
            while words:  # `a && b`: each part is a command
                part = words[:words.index("&&")] if "&&" in words else words
                words = words[len(part) + 1:]
                cmd = _command(part)
                if cmd:
                    found.append((page.name, line, *cmd))
    return found


COMMANDS = commands()


def test_the_pages_hold_the_commands_they_should():
    kinds = {(kind, tuple(words[:1])) for _, _, kind, words in COMMANDS}
    for sub in ("run", "report", "describe", "train", "list", "consistency", "ref-stats", "prepare"):
        assert ("cli", (sub,)) in kinds, f"no `run_bench.py {sub}` command found in the docs"
    assert ("module", ("bench.gpu_check",)) in kinds
    readme = [line for page, line, _, _ in COMMANDS if page == "README.md"]
    # The two commands, exactly.
    assert "./setup.sh && .venv/bin/python run_bench.py" in readme
    assert (REPO / "README.md").read_text().count("    ./setup.sh && .venv/bin/python -m pytest -q\n") == 1


@pytest.mark.parametrize("page,line,words", [(p, line, w) for p, line, kind, w in COMMANDS if kind == "cli"],
                         ids=lambda v: v if isinstance(v, str) and v.endswith(".md") else "")
def test_every_run_bench_command_parses(page, line, words):
    """argparse on the command's words, as `run_bench.py` parses them (a --help in it exits 0). A command
    named alone in prose (`run_bench.py describe`) must be a command: its --help."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(words + ["--help"] if len(words) == 1 and not words[0].startswith("-") else words)
        except SystemExit as exc:
            assert exc.code == 0, f"{page}: `{line}` does not parse: {err.getvalue().strip()}"


class _Parsed(Exception):
    """Raised once a module's parser has read its arguments: nothing of the command runs."""


@pytest.mark.parametrize("page,line,words", [(p, line, w) for p, line, kind, w in COMMANDS if kind == "module"],
                         ids=lambda v: v if isinstance(v, str) and v.endswith(".md") else "")
def test_every_python_m_bench_command_parses(page, line, words, monkeypatch):
    """`python -m bench.X ARGS`: the module runs as __main__ until its parser has read ARGS."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [words[0], *words[1:]])
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        with pytest.raises((_Parsed, SystemExit)) as exc:
            runpy.run_module(words[0], run_name="__main__", alter_sys=True)
    assert exc.type is _Parsed or exc.value.code == 0, f"{page}: `{line}` does not parse: {err.getvalue().strip()}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lowercase, every character but letters,
    digits, '_', '-' and spaces dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen, out = {}, set()
    for line in _split(page.read_text())[2].split("\n"):
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers a repeated heading
            seen[base] = n + 1
    return out


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        prose = _split(page.read_text())[2]
        prose = re.sub(r"`[^`]*`", "code", prose)  # a link inside code is not a link
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not ours to check
                found.append((page, target))
    return found


LINKS = links()


def test_the_pages_link_each_other():
    targets = {(p.name, t.split("#")[0]) for p, t in LINKS}
    for page in PAGES[1:]:
        assert ("README.md", f"docs/{page.name}") in targets, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page,target", LINKS, ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_relative_link_and_anchor_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.name}: link {target!r}: {dest} does not exist"
    if anchor:
        assert dest.suffix == ".md", f"{page.name}: link {target!r}: an anchor into a file that is not a page"
        assert anchor in anchors(dest), f"{page.name}: link {target!r}: {dest.name} has no heading with that anchor"


def test_slugs_follow_githubs_rules():
    assert slug("The field's methods side by side (`comparison`)") == "the-fields-methods-side-by-side-comparison"
    assert slug("The packages of `bench/`") == "the-packages-of-bench"
    assert slug("1. Install, and look at a report") == "1-install-and-look-at-a-report"
    assert slug("[suite]") == "suite"


def test_the_tutorials_plugin_and_every_suite_example_load(tmp_path):
    """The tutorial's plugin file and every suite in the pages, written out as the tutorial says, load
    and resolve (the plugin, each method's hyperparameters, the data set, the evaluation)."""
    from bench.core.diffusion import make_schedule
    from bench.core.registry import get_method
    from bench.suite.grid import load_suite

    blocks = [b for page in PAGES for b in _split(page.read_text())[0]]
    plugin = [code for lang, code in blocks if lang == "python" and "class Laplace(Method)" in code]
    suites = [code for lang, code in blocks if lang == "toml" and "[grid]" in code]
    assert len(plugin) == 1 and len(suites) >= 2
    (tmp_path / "my_methods").mkdir()
    (tmp_path / "my_methods" / "laplace.py").write_text(plugin[0])
    for i, text in enumerate(suites):
        (tmp_path / f"suite{i}.toml").write_text(text)
        suite = load_suite(tmp_path / f"suite{i}.toml")
        assert "laplace-b1" in {m.label for m in suite.methods}
    # What the tutorial says its p(t) puts where, with b = 1.
    tutorial = (REPO / "docs" / "tutorial.md").read_text()
    m = re.search(r"(\d+)% of the draws fall on t in 200-299 and ([\d.]+)% on t >= 700", tutorial)
    probs = get_method("laplace", {"b": 1.0}, [str(tmp_path / "my_methods")]).timestep_probs(0.0, make_schedule())
    assert round(100 * float(probs[200:300].sum())) == int(m.group(1))
    assert f"{100 * float(probs[700:].sum()):.2f}" == m.group(2)
