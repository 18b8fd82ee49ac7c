"""User component plugins.

Three sources, loaded before an experiment is validated, and no others:
* every ``*.py`` in the ``registry/`` folder of the rcnn-lab project itself (the checkout that
  holds the ``rcnn_lab`` package; absent when rcnn-lab is installed from a wheel). Not a folder
  found by walking up from the experiment file or from the working directory: a ``registry/`` in
  a shared folder (a temp folder, a home directory) must not run code;
* files listed under ``plugins:`` in an experiment (paths relative to that file);
* installed packages exposing the entry-point group ``rcnn_lab.components``.

Commands print which files and entry points were loaded (``plugins: ...``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from rcnn_lab.errors import ConfigError, Problem, display_path

ENTRY_POINT_GROUP = "rcnn_lab.components"
_loaded: dict[Path, str] = {}
_entry_points: list[str] = []
_entry_points_loaded = False


def project_registry() -> Path | None:
    """``registry/`` beside the ``rcnn_lab`` package in an rcnn-lab checkout, else None."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    folder = root / "registry"
    if not folder.is_dir() or not pyproject.is_file():
        return None
    try:
        ours = 'name = "rcnn-lab"' in pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return folder if ours else None


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


def load_entry_points() -> list[str]:
    """Call every ``rcnn_lab.components`` entry point once; return their names (``dist:name``)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if callable(obj):
                obj()
            _entry_points.append(f"entry point {ep.name} ({ep.value})")
    return list(_entry_points)


def load_plugins(extra: list[str] = (), extra_base: Path | None = None) -> list[str]:
    """Load the project's registry/ plugins, entry points and ``extra`` files (relative to ``extra_base``,
    default the working directory); return what was loaded, as users should read it.

    Register the built-ins first (``rcnn_lab.components.register_builtins``) so that a plugin
    reusing a built-in name is reported.
    """
    folder = project_registry()
    files = sorted(folder.glob("*.py")) if folder else []
    for f in files:
        load_file(f, key=f"registry/{f.name}")
    base = extra_base or Path.cwd()
    listed = []
    for i, rel in enumerate(extra):
        if not isinstance(rel, str):
            raise ConfigError([Problem(f"plugins[{i}]", "must be a file path")])
        load_file(base / rel, key=f"plugins[{i}]")
        listed.append(base / rel)
    return [display_path(f) for f in (*files, *listed)] + load_entry_points()
