"""The package's shape, checked from the source alone (ast; nothing to install): bench's subpackages
import only the ones before them in LAYERS, no module imports itself through a circle, no module
reaches into another package's underscore names, every function-level import of a bench module
says why it is there, and modules and functions stay readable in size. docs/architecture.md
describes the same order."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Dependency order: a module may import modules of its own layer and of layers before it.
LAYERS = ["errors", "fileio", "terminal", "core", "models", "data", "eval", "train", "suite", "report", "results", "tools",
          "listing", "cli", "gpu_check"]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 90


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(BENCH.rglob("*.py")):
        parts = path.relative_to(BENCH.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    """'bench.train.loop' -> 'train'; 'bench.errors' -> 'errors'."""
    return module.split(".")[1] if module != "bench" else "bench"


def _imports(module: str) -> list[tuple[str, str | None, ast.stmt, bool]]:
    """(imported bench module, imported name or None, statement, at module level) for every import of a
    bench module in `module`, wherever it sits (module level, functions, TYPE_CHECKING blocks)."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node, id(node) in top) for a in node.names if a.name.startswith("bench")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub, None, node, id(node) in top) if sub in MODULES
                             else (node.module, a.name, node, id(node) in top))
    return [f for f in found if f[0] in MODULES]


def _edges() -> dict[str, set[str]]:
    return {m: {t for t, _, _, _ in _imports(m) if t != m and t != "bench"} for m in MODULES}


def test_every_bench_module_is_in_a_declared_layer():
    unknown = sorted({_layer(m) for m in MODULES} - set(LAYERS) - {"bench"})
    assert not unknown, f"add these packages to LAYERS (and docs/architecture.md): {unknown}"


def test_packages_import_only_the_ones_before_them():
    bad = [f"{m} imports {t}" for m, targets in _edges().items() for t in targets
           if LAYERS.index(_layer(t)) > LAYERS.index(_layer(m))]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    edges = _edges()
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_finds_a_circle_and_a_backward_import():
    """The two checks above on a made-up graph, so a bug in them cannot pass silently."""
    global _edges
    real = _edges
    try:
        _edges = lambda: {"bench.core.a": {"bench.train.b"}, "bench.train.b": {"bench.core.a"}}  # noqa: E731
        with pytest.raises(AssertionError, match="import circles"):
            test_no_import_circles()
        with pytest.raises(AssertionError, match="bench.core.a imports bench.train.b"):
            test_packages_import_only_the_ones_before_them()
    finally:
        _edges = real


def test_no_underscore_name_crosses_a_module():
    bad = [f"{m} imports {name} from {t}" for m in MODULES for t, name, _, _ in _imports(m)
           if name and name.startswith("_") and not name.startswith("__") and t != m]
    assert not bad, "make these public, or keep them inside their module:\n" + "\n".join(bad)


def test_function_level_imports_say_why():
    """A bench import inside a function is deliberate (torch-free start-up of the CLI, the runner and the
    report): the first import of each such block has a comment on its line or the line above."""
    missing = []
    for m, path in MODULES.items():
        text = path.read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        wanted = {id(s) for _, _, s, top in _imports(m) if not top}
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if node is tree or not isinstance(body, list):
                continue
            for i, s in enumerate(body):
                if id(s) not in wanted or (i and isinstance(body[i - 1], (ast.Import, ast.ImportFrom))):
                    continue  # not a bench import, or within a block whose first import says why
                above = lines[s.lineno - 2].strip()
                if "#" not in lines[s.lineno - 1] and not above.startswith("#"):
                    missing.append(f"{path.relative_to(BENCH.parent)}:{s.lineno}")
    assert not missing, "function-level imports without a reason:\n" + "\n".join(missing)


def test_modules_and_functions_stay_readable():
    long = []
    for m, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{m}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_every_module_imports_and_report_code_stays_torch_free():
    """Import each module in a fresh interpreter (an import-time circle or a moved name fails here), and
    check that the report package and the suite's loading need no torch."""
    code = ("import importlib, sys\n"
            f"mods = {sorted(m for m in MODULES if m != 'bench.gpu_check')!r}\n"
            "light = [m for m in mods if m.startswith(('bench.report', 'bench.suite.grid', 'bench.suite.schema'))]\n"
            "for m in light: importlib.import_module(m)\n"
            "assert 'torch' not in sys.modules, 'torch imported by ' + repr(light)\n"
            "for m in mods: importlib.import_module(m)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
