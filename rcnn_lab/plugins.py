"""User component plugins.

Three sources, loaded before an experiment is validated:
* every ``*.py`` in the top-level ``registry/`` folder (found by walking up from the experiment
  file, else the working directory); the folder is not a package, files are loaded by path;
* files listed under ``plugins:`` in an experiment (paths relative to that file);
* installed packages exposing the entry-point group ``rcnn_lab.components``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from rcnn_lab.errors import ConfigError, Problem

ENTRY_POINT_GROUP = "rcnn_lab.components"
_loaded: dict[Path, str] = {}
_entry_points_loaded = False


def find_registry_dir(start: str | Path | None = None) -> Path | None:
    """Nearest ``registry/`` folder holding plugins, walking up from ``start`` (default: cwd)."""
    here = Path(start or Path.cwd()).resolve()
    if here.is_file():
        here = here.parent
    for folder in (here, *here.parents):
        cand = folder / "registry"
        if cand.is_dir() and any(cand.glob("*.py")):
            return cand
    cand = Path.cwd() / "registry"
    return cand if cand.is_dir() else None


def load_file(path: str | Path, key: str = "plugins") -> None:
    """Import one plugin file by path (once per resolved path)."""
    path = Path(path).resolve()
    if path in _loaded:
        return
    if not path.is_file():
        raise ConfigError([Problem(key, f"plugin file {path.name} not found at {path}; fix the path")])
    name = f"rcnn_lab_plugins.{path.stem}_{len(_loaded)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _loaded[path] = name
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as exc:
        del _loaded[path]
        sys.modules.pop(name, None)
        raise ConfigError([Problem(key, f"plugin {path.name} failed to load: {type(exc).__name__}: {exc}")]) from exc


def load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if callable(obj):
            obj()


def load_plugins(experiment_file: str | Path | None = None, extra: list[str] = (), extra_base: Path | None = None) -> list[str]:
    """Load registry/ plugins, entry points and ``extra`` files; return the loaded file names.

    Register the built-ins first (``rcnn_lab.components.register_builtins``) so that a plugin
    reusing a built-in name is reported.
    """
    folder = find_registry_dir(experiment_file)
    files = sorted(folder.glob("*.py")) if folder else []
    for f in files:
        load_file(f, key=f"registry/{f.name}")
    base = extra_base or (Path(experiment_file).parent if experiment_file else Path.cwd())
    for i, rel in enumerate(extra):
        load_file(base / rel, key=f"plugins[{i}]")
    load_entry_points()
    return [f.name for f in files] + list(extra)
