"""The `list` command. Compact by default: one line per method, suite, data set and architecture,
read from the files' text (ast, tomllib) so that it starts in a fraction of a second without torch;
`--long` imports the registries for every hyperparameter, range and source. A plugin named with
--plugins is imported in both forms: a user's file is listed as the runs will load it, or refused."""

import ast
import re
from pathlib import Path

import tomllib

from bench.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
WIDTH = 80  # a terminal's default: every compact line fits
LONG_HINT = "list --long: slots, hyperparameters, ranges, sources; describe NAME: one method"


def _literal(node: ast.AST | None):
    """A node's literal value (frozenset({...}) as its set), or None when it is computed."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "frozenset" and len(node.args) == 1:
        node = node.args[0]
    try:
        return ast.literal_eval(node) if node is not None else None
    except (ValueError, TypeError, SyntaxError):
        return None


def _assigned(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """name -> value node of the plain assignments in a module's or a class's body."""
    out = {}
    for s in body:
        if isinstance(s, ast.Assign):
            out.update({t.id: s.value for t in s.targets if isinstance(t, ast.Name)})
        elif isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None:
            out[s.target.id] = s.value
    return out


def summary(doc: str | None) -> str:
    """A docstring's first clause: up to its first ': ' or '. ' outside brackets, on one line, a citation's
    code references dropped ("(Yu et al. 2024; repo file.py)" -> "(Yu et al. 2024)")."""
    text = re.sub(r";[^()]*\)", ")", " ".join((doc or "").split("\n\n")[0].split()))
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and ch in ".:" and text[i + 1:i + 2] in (" ", ""):
            return text[:i]
    return text


def method_rows(files: list[Path]) -> list[tuple[str, str]]:
    """(name, summary) of the methods in plugin files, read without importing them: the classes that assign
    a literal `name` (the registry takes every named Method subclass; tests/test_cli_polish.py checks that
    the two agree on the built-ins)."""
    rows = []
    for path in files:
        try:
            body = ast.parse(path.read_text(encoding="utf-8")).body
        except (SyntaxError, UnicodeDecodeError) as exc:  # as the registry says it when it imports the file
            raise ConfigError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from None
        for node in body:
            if not isinstance(node, ast.ClassDef):
                continue
            attrs = _assigned(node.body)
            name = _literal(attrs.get("name"))
            if isinstance(name, str) and name:
                rows.append((name, summary(ast.get_docstring(node))))
    return rows


def dataset_rows(folder: Path) -> list[tuple[str, str, str]]:
    """(NAME, channels and resolution, SOURCE) of the loader files in `folder`, from their module-level constants."""
    rows = []
    for path in sorted(folder.glob("*.py")):
        c = {k: _literal(v) for k, v in _assigned(ast.parse(path.read_text(encoding="utf-8")).body).items()}
        size = f"{c.get('CHANNELS')} ch, {c.get('RESOLUTION') or 'any'} px"  # RESOLUTION 0: the data's own
        rows.append((c.get("NAME") or path.stem, size, c.get("SOURCE") or ""))
    return rows


def arch_rows(networks: Path) -> list[tuple[str, str]]:
    """(name, description) of the ARCHS table in bench/models/networks.py, read as text."""
    table = _assigned(ast.parse(networks.read_text(encoding="utf-8")).body)["ARCHS"]
    return [(_literal(k), _literal(v.elts[1])) for k, v in zip(table.keys, table.values)]


def suite_rows(folder: Path, full: bool = False) -> list[tuple[str, str]]:
    """(name, the description's first sentence, or all of it) of the suites in `folder`; a file that does
    not parse is listed with the reason (run SUITE says the whole of it)."""
    rows = []
    for path in sorted(folder.glob("*.toml")):
        try:
            head = tomllib.loads(path.read_text(encoding="utf-8")).get("suite", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            rows.append((path.stem, f"(not readable: {exc})"))
            continue
        text = " ".join(str(head.get("description", "")).split())
        rows.append((path.stem, text if full else re.split(r"(?<=[a-z0-9)])[.:] ", text, maxsplit=1)[0]))
    return rows


def _lines(title: str, rows: list[tuple]) -> list[str]:
    """A titled block of rows, columns aligned, each line cut to WIDTH with '...'."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    out = [title]
    for r in rows:
        line = "  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + str(r[-1])
        out.append(line.rstrip() if len(line) <= WIDTH else line[:WIDTH - 3].rstrip() + "...")
    return out


def compact(plugins=()) -> str:
    """The default listing, one short line per entry."""
    methods = method_rows(sorted(p for p in (REPO / "methods").glob("*.py") if not p.name.startswith("_")))
    if plugins:  # a user's files: imported, as their runs will import them (an error is one line)
        # torch only for an explicit --plugins
        from bench.core.registry import load_plugins

        known = {r[0] for r in methods}
        methods += [(n, summary(cls.__doc__))
                    for n, cls in load_plugins(plugins).items() if n not in known]
    return "\n".join([
        *_lines("methods (run_bench.py describe NAME)", sorted(methods)),
        *_lines("suites (run_bench.py run NAME)", suite_rows(REPO / "suites")),
        *_lines("datasets", dataset_rows(REPO / "datasets")),
        *_lines("architectures", arch_rows(REPO / "bench" / "models" / "networks.py")),
        LONG_HINT])


def print_long(plugins=()) -> None:
    """The full tables: every method's hyperparameters (default, range, meaning) and source."""
    from rich.console import Console
    from rich.table import Table

    # imported here: the compact listing starts without torch
    from bench.core.registry import load_plugins
    from bench.data.loading import registry as dataset_registry
    from bench.models.networks import ARCHS

    console = Console()
    table = Table(title="Methods", show_lines=True)
    for col in ("name", "slots", "hyperparameters (default, range)", "source"):
        table.add_column(col)
    for name, cls in sorted(load_plugins(plugins).items()):
        params = "\n".join(f"{k} = {p.default!r}  {p.describe_range()}  {p.doc}" for k, p in cls.params.items())
        table.add_row(name, ", ".join(sorted(cls().slots)) or "-", params or "-", cls.source)
    console.print(table)
    table = Table(title="Suites")
    for col in ("name", "description"):
        table.add_column(col)
    for row in suite_rows(REPO / "suites", full=True):
        table.add_row(*row)
    console.print(table)
    table = Table(title="Datasets")
    for col in ("name", "channels", "resolution", "source"):
        table.add_column(col)
    for name, mod in sorted(dataset_registry().items()):
        table.add_row(name, str(mod.CHANNELS), str(mod.RESOLUTION), mod.SOURCE)
    console.print(table)
    table = Table(title="Architectures")
    for col in ("name", "settings", "description"):
        table.add_column(col)
    for name, (settings, doc) in ARCHS.items():
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in settings.items()), doc)
    console.print(table)


def cmd_list(args) -> None:
    if args.long:
        print_long(args.plugins)
    else:
        print(compact(args.plugins))
