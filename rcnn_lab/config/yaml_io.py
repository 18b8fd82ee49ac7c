"""Reading YAML from users: ``safe_load`` with YAML 1.2 floats, no duplicate keys, and hard limits.

Every experiment file, ``base:`` file and ``--set`` value goes through :func:`safe_load`. Before any
Python object is built, the text is checked against three limits, so a hostile or broken input
fails in milliseconds with one line instead of exhausting memory or the interpreter's stack:

* size: at most :data:`MAX_BYTES` of UTF-8 text (checked before the file is read);
* nesting: at most :data:`MAX_DEPTH` levels of mappings and lists;
* alias expansion: at most :data:`MAX_NODES` values once every ``*alias`` is expanded (a "billion
  laughs" document is a few hundred bytes that expand to billions of values).

The checks walk YAML's event stream (``yaml.parse``), which is iterative: thousands of nesting
levels cannot overflow the stack while they are being counted.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path

import yaml

from rcnn_lab.errors import ConfigError, Problem

MAX_BYTES = 1 << 20  # 1 MiB: experiment files are a few KB
MAX_DEPTH = 32  # the deepest key of the schema is ~6 levels
MAX_NODES = 20_000  # values after alias expansion; a full experiment is a few hundred


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """``yaml.SafeLoader`` (libyaml's when built with it: ~20x faster) that reads ``1e-4`` as a float
    (YAML 1.2) and rejects duplicate and non-scalar keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a plain name, got a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def check_limits(text: str) -> str | None:
    """The first limit ``text`` breaks, as a message, or None. Does not build any object."""
    if len(text) > MAX_BYTES:
        return f"is {len(text):,} characters; the limit is {MAX_BYTES:,} (split it with base: files)"
    sizes: dict[str, int] = {}
    aliases = False
    stack: list[list] = [[None, 0]]  # [anchor, expanded size so far] per open collection
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([event.anchor, 0])
                if len(stack) - 1 > MAX_DEPTH:
                    line = event.start_mark.line + 1
                    return f"nests deeper than {MAX_DEPTH} levels (line {line}); flatten it"
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, size = stack.pop()
                size += 1
            elif isinstance(event, yaml.ScalarEvent):
                anchor, size = event.anchor, 1
            elif isinstance(event, yaml.AliasEvent):
                anchor, size, aliases = None, sizes.get(event.anchor, 1), True
            else:
                continue
            if anchor is not None:
                sizes[anchor] = size
            stack[-1][1] += size
            if stack[-1][1] > MAX_NODES:
                line = event.start_mark.line + 1
                if not aliases:
                    return (f"holds more than {MAX_NODES:,} values (line {line}); an experiment needs a few hundred: "
                            "shorten the list")
                return (f"expands to more than {MAX_NODES:,} values through its aliases (line {line}); "
                        "write the values out instead of nesting *aliases")
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml stops at 1,000 levels while scanning ahead
            mark = getattr(exc, "problem_mark", None)
            return f"nests deeper than {MAX_DEPTH} levels" + (f" (line {mark.line + 1})" if mark else "") + "; flatten it"
        return None  # reported with its position by the loader itself
    return None


def safe_load(text: str, source: str = "", key: str = ""):
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-4``), after :func:`check_limits`.

    Broken limits raise ``ConfigError`` naming ``source`` (a file or ``--set``) and ``key``;
    YAML syntax errors propagate as ``yaml.YAMLError``.
    """
    broken = check_limits(text)
    if broken:
        raise ConfigError([Problem(key, f"YAML {broken}", source or None)])
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as exc:  # an integer of more than 4,300 digits (Python's int() limit)
        if isinstance(exc, yaml.YAMLError):
            raise
        raise ConfigError([Problem(key, f"YAML value out of range ({str(exc).split(';')[0][:120]}); "
                                   "numbers are 64-bit", source or None)]) from None


def unreadable(exc: OSError) -> str:
    """Why a file cannot be read, for users: a symlink loop, a missing permission, the OS's words otherwise."""
    import errno

    if exc.errno == errno.ELOOP:
        return "is a symbolic link that loops (or goes through too many links); point it at a real file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read (permission denied, on the file or a folder above it); fix its permissions (chmod)"
    if exc.errno == errno.ENAMETOOLONG:
        return "path is too long for the file system; fix the path"
    return f"cannot be read ({exc.strerror or type(exc).__name__}); check the path"


def read_text(path: Path, file: str) -> str:
    """The UTF-8 text of ``path``: size checked before reading, decoding and OS errors as one line."""
    try:
        if not path.is_file():
            raise ConfigError([Problem("", "file not found; check the path", file)])
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError([Problem("", f"file is {size:,} bytes; experiment files are limited to {MAX_BYTES:,} "
                                       "(split it with base: files)", file)])
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem("", unreadable(exc), file)]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError([Problem("", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
                                   "save it as UTF-8 YAML", file)]) from None


def read_yaml(path: Path, file: str | None = None) -> dict:
    """A YAML mapping from ``path``, with one-line errors naming the file and position."""
    file = file or str(path)
    text = read_text(path, file)
    try:
        data = safe_load(text, file)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([Problem("", f"invalid YAML at {where}{problem}", file)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("", f"top level must be a mapping, got {type(data).__name__}", file)])
    return data
