"""Errors rcnn-lab reports to users: one line per problem, naming file, dotted key and fix."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass

EXCERPT = 60  # characters of a user's value quoted in an error
MAX_LINE = 1000  # an error line longer than this is cut (a last guard; values are excerpted at the source)

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 2, 4, 4, 4
_repr.maxstring = _repr.maxother = _repr.maxlong = EXCERPT
_repr.indent = None


def excerpt(value, limit: int = EXCERPT) -> str:
    """``repr(value)`` in at most ``limit`` characters: quote user input in errors without echoing all of it."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cut(text: str, limit: int = EXCERPT) -> str:
    """``text`` (not quoted) in at most ``limit`` characters."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Problem:
    """One thing wrong with user input."""

    path: str
    message: str
    file: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        key = f"{self.path}: " if self.path else ""
        line = f"{where}{key}{self.message}"
        return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


class RcnnLabError(Exception):
    """Base class for errors shown to users without a traceback."""

    exit_code = 1


class ConfigError(RcnnLabError):
    """Invalid user input (YAML, flags, data, checkpoints). Exit code 2."""

    exit_code = 2

    def __init__(self, problems: Iterable[Problem] | str, path: str = "", file: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(path, problems, file)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class TrainingError(RcnnLabError):
    """A run that cannot go on (non-finite loss, ...)."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """Closest match to ``name`` among ``choices`` or None."""
    matches = difflib.get_close_matches(str(name)[:100], list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    match = closest(name, choices)
    return f"; did you mean '{match}'?" if match else ""


def display_path(path) -> str:
    """A path as users should read it: relative to the working directory when inside it."""
    import os

    text = str(path)
    try:
        rel = os.path.relpath(text)
    except ValueError:
        return text
    return rel if not rel.startswith("..") else text


def join(path: str, key: str | int) -> str:
    """Join a dotted path and a key (``a.b`` + ``c`` -> ``a.b.c``, lists as ``a[0]``)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    key = cut(key)
    return f"{path}.{key}" if path else key
