"""Output paths given on the command line (``--out``): checked before anything is computed or written."""

from __future__ import annotations

import os
from pathlib import Path

from rcnn_lab.errors import ConfigError, Problem, cut, display_path


def check_writable(path: str | Path, flag: str) -> None:
    """``path`` (a file or folder to be created) can be written: its nearest existing ancestor is a folder
    this process may write into. Else one line naming ``flag``: a file in the way, no permission."""
    target = Path(path).absolute()
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError([Problem(flag, f"{cut(display_path(target), 120)!r} cannot be written (permission denied); "
                                   "choose another path")])
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError([Problem(flag, f"{cut(display_path(parent), 120)!r} is a file, so nothing can be written "
                                   f"under it; choose another path")])
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError([Problem(flag, f"cannot write into {cut(display_path(parent), 120)!r} (permission denied); "
                                   "choose another path")])


def write_failed(exc: OSError, path: str | Path, flag: str) -> ConfigError:
    """An ``OSError`` met while writing ``path`` (a full disk, a folder removed meanwhile) as one line naming ``flag``."""
    return ConfigError([Problem(flag, f"could not write {cut(display_path(path), 120)!r} "
                               f"({exc.strerror or type(exc).__name__}); choose another path or free space")])
