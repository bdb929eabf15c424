"""The method registry: a plain dict of name -> Method subclass, filled from plugin files.

Plugins are loaded by file path (every ``*.py`` in the repository's ``methods/`` folder, then
every file or folder named with ``--plugins``), so adding a method is one new file.
"""

import importlib.util
import inspect
import sys
from pathlib import Path

from bench.core.spec import Method, check_slots
from bench.errors import ConfigError, UnknownMethodError

METHODS_DIR = Path(__file__).resolve().parents[2] / "methods"

_loaded: dict[str, type[Method]] = {}
_loaded_paths: set[Path] = set()


def _plugin_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
    if path.is_file() and path.suffix == ".py":
        return [path]
    raise ConfigError(f"plugin path {str(path)!r} is not a .py file or a folder; pass an existing path to --plugins")


#: modules a plugin may import, under the names they had before bench/ moved into subpackages
MOVED = {"bench.spec": "bench.core.spec", "bench.diffusion": "bench.core.diffusion", "bench.config": "bench.core.config",
         "bench.registry": "bench.core.registry", "bench.describe": "bench.core.describe"}


def _load_file(path: Path) -> None:
    path = path.resolve()
    if path in _loaded_paths:
        return
    module_name = f"diffbench_plugins.{path.parent.name}.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a broken plugin names itself; its sys.exit() must not end the command
        del sys.modules[module_name]
        if isinstance(exc, SystemExit):
            raise ConfigError(f"plugin {path} called sys.exit({exc.code!r}) on import; a plugin file only defines "
                              "methods: remove the call (or put it under `if __name__ == \"__main__\":`)") from None
        moved = MOVED.get(getattr(exc, "name", None) or "") if isinstance(exc, ModuleNotFoundError) else None
        fix = f"; {exc.name} is now {moved}: change the plugin's import" if moved else ""
        raise ConfigError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}{fix}") from exc
    # Check every class first, so a refused file registers nothing and is refused again next time.
    classes = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
               if cls.__module__ == module_name and issubclass(cls, Method)]
    found = [cls for cls in classes if cls.name]
    # A Method without a name is never registered: refused, unless it is the base of a named one here.
    unnamed = [cls for cls in classes if not cls.name and not any(issubclass(f, cls) for f in found)]
    if unnamed:
        del sys.modules[module_name]
        raise ConfigError(f"{path}: class {unnamed[0].__name__} is a Method without a name, so no run could use it; "
                          "give it name = \"<method>\" (its key for --method and suites)")
    for cls in found:
        other = _loaded.get(cls.name)
        try:
            if other is not None and other is not cls:
                raise ConfigError(f"method name {cls.name!r} is defined twice ({inspect.getfile(other)} and {path}); "
                                  "rename one")
            check_slots(cls)
        except ConfigError as exc:
            del sys.modules[module_name]
            raise ConfigError(str(exc) if "defined twice" in str(exc) else f"{path}: {exc}") from None
    _loaded.update({cls.name: cls for cls in found})
    _loaded_paths.add(path)


def load_plugins(paths=()) -> dict[str, type[Method]]:
    """Load the built-in methods and the given extra plugin paths; return the registry."""
    for f in _plugin_files(METHODS_DIR):
        _load_file(f)
    for p in paths or ():
        for f in _plugin_files(Path(p)):
            _load_file(f)
    return _loaded


def get_method_class(name: str, plugins=()) -> type[Method]:
    registry = load_plugins(plugins)
    if name not in registry:
        raise UnknownMethodError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(registry))} "
            "(add your own with --plugins PATH)"
        )
    return registry[name]


def get_method(name: str, params: dict | None = None, plugins=()) -> Method:
    """Instantiate a method with validated hyperparameters."""
    return get_method_class(name, plugins)(**(params or {}))


def method_label(name: str, params: dict | None = None, plugins=()) -> str:
    return get_method(name, params, plugins).label
