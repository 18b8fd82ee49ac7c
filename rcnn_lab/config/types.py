"""Typed conversion of YAML values: the schema's and the factories' annotations are the types.

``convert(value, annotation, path, problems)`` returns the value converted to the annotation
(ints become floats where floats are expected, lists become tuples where tuples are expected,
mappings become dataclasses or component specs) and appends one ``Problem`` per mismatch.

Component specs are checked by the family's registry, which lives in a layer above this one: the
caller hands in ``families`` (family name -> an object with ``check_spec``), usually
``rcnn_lab.registry.registry_for``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, Union

from rcnn_lab.errors import Problem, cut, did_you_mean, excerpt, join

INT_LIMIT = 2**63


@dataclass(frozen=True)
class Spec:
    """A validated component spec: ``{type: NAME, **kwargs}``."""

    type: str
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"type": self.type, **to_plain(self.kwargs)}


@dataclass(frozen=True)
class Family:
    """Marks a schema field as a component spec of one registry family."""

    name: str


class SpecChecker(Protocol):
    """What converting a component spec needs from its family (``rcnn_lab.registry.Registry``)."""

    def check_spec(self, value: Any, path: str, problems: list[Problem]) -> Spec | None: ...


Families = Callable[[str], SpecChecker]


@dataclass(frozen=True)
class AsWritten:
    """A family that takes ``{type: NAME, **kwargs}`` as written, unchecked: for reading an
    experiment's names and tracking settings without its components (no registry, no torch)."""

    name: str

    def check_spec(self, value: Any, path: str, problems: list[Problem]) -> Spec | None:
        if isinstance(value, Spec):
            return value
        if isinstance(value, str):
            return Spec(value, {})
        if not isinstance(value, dict) or "type" not in value:
            problems.append(Problem(path, f"expected a {self.name} spec {{type: NAME, ...}}, got {_describe(value)}"))
            return None
        return Spec(str(value["type"]), {k: v for k, v in value.items() if k != "type"})


@dataclass(frozen=True)
class Bound:
    """Marks a number that must lie above ``gt`` / at least ``ge`` / at most ``le``: ``Annotated[float, Bound(gt=0)]``."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None  # an upper bound (a size that would exhaust memory or disk)

    def check(self, value: float) -> str | None:
        if self.gt is not None and not value > self.gt:
            return f"must be > {self.gt:g}, got {value:g}"
        if self.ge is not None and not value >= self.ge:
            return f"must be >= {self.ge:g}, got {value:g}"
        if self.le is not None and not value <= self.le:
            return f"must be <= {self.le:,}, got {excerpt(value)}"
        return None


Positive = Annotated[float, Bound(gt=0)]
NonNegative = Annotated[float, Bound(ge=0)]


def component(family: str):
    """Annotation for a schema field holding a spec of ``family``."""
    return Annotated[Spec, Family(family)]


def component_list(family: str):
    return list[Annotated[Spec, Family(family)]]


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None) or tp is None:
        return "null"
    if origin is Annotated:
        inner, fam = typing.get_args(tp)[:2]
        if isinstance(fam, Bound):
            return type_name(inner)
        return f"a {fam.name} spec {{type: NAME, ...}}"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        inner = type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {value}"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {excerpt(value)}"


def convert(value: Any, tp: Any, path: str, problems: list[Problem], families: Families | None = None) -> Any:
    """Convert ``value`` to ``tp``; record problems under ``path``; ``families`` checks component specs."""
    if tp is Any or tp is typing.Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        if isinstance(args[1], Bound):
            start = len(problems)
            out = convert(value, args[0], path, problems, families)
            broken = args[1].check(out) if len(problems) == start else None
            if broken:
                problems.append(Problem(path, broken))
            return out
        if families is None:
            raise TypeError(f"{path}: converting a {args[1].name} spec needs `families` (e.g. rcnn_lab.registry.registry_for)")
        return families(args[1].name).check_spec(value, path, problems)
    if tp is type(None) or tp is None:
        if value is not None:
            problems.append(Problem(path, f"expected null, got {_describe(value)}"))
        return None
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return convert(value, non_null[0], path, problems, families)
        for arg in args:
            if arg is type(None):
                continue
            trial: list[Problem] = []
            out = convert(value, arg, path, trial, families)
            if not trial:
                return out
        problems.append(Problem(path, f"expected {type_name(tp)}, got {_describe(value)}"))
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append(
                Problem(path, f"expected one of {choices}, got {_describe(value)}"
                        + did_you_mean(cut(value, 100), [str(a) for a in args]))
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(path, f"expected bool (true/false), got {_describe(value)}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(Problem(path, f"expected int, got {_describe(value)}"))
        elif not -INT_LIMIT < value < INT_LIMIT:  # torch and numpy take 64-bit integers
            problems.append(Problem(path, f"is out of range (64-bit integers), got {excerpt(value)}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(path, f"expected float, got {_describe(value)}"))
            return value
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):  # NaN slips through every comparison check, inf through most
            problems.append(Problem(path, f"must be a finite number, got {excerpt(value)}"))
            return value
        return number
    if tp is str:
        if not isinstance(value, str):
            problems.append(Problem(path, f"expected str, got {_describe(value)}"))
        return value
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(path, f"expected {type_name(tp)}, got {_describe(value)}"))
            return value
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                problems.append(Problem(path, f"expected {len(args)} items, got {len(value)}"))
                return value
            return tuple(convert(v, a, join(path, i), problems, families) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [convert(v, inner, join(path, i), problems, families) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(Problem(path, f"expected a mapping, got {_describe(value)}"))
            return value
        vt = args[1] if args else Any
        return {k: convert(v, vt, join(path, k), problems, families) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return convert_dataclass(value, tp, path, problems, families)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            problems.append(Problem(path, f"expected {type_name(tp)}, got {_describe(value)}"))
        return value
    return value


def _complete_spec(value: Any, f: dataclasses.Field, tp: Any) -> Any:
    """``{lr: 0.01}`` under a component field without ``type``: arguments for the default component."""
    if not isinstance(value, dict) or "type" in value:
        return value
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if not any(typing.get_origin(c) is Annotated for c in candidates):
        return value
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, dict) and "type" in default:
        return {**default, **value}
    return value


def convert_dataclass(value: Any, cls: type, path: str, problems: list[Problem], families: Families | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping strictly: unknown keys are problems."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(Problem(path, f"expected a mapping, got {_describe(value)}"))
        return None
    start = len(problems)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, val in value.items():
        if key not in fields:
            problems.append(Problem(join(path, key), "unknown key" + did_you_mean(key, fields)))
            continue
        val = _complete_spec(val, fields[key], hints[key])
        kwargs[key] = convert(val, hints[key], join(path, key), problems, families)
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(Problem(join(path, name), "required key is missing"))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # defaults written as plain data are converted like user input
        kwargs[name] = convert(default, hints[name], join(path, name), problems, families)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # wrong types already reported
        if len(problems) == start:
            problems.append(Problem(path, str(exc)))
        return None
    check = getattr(obj, "check", None)
    if check is not None and len(problems) == start:
        for sub, message in check():
            problems.append(Problem(join(path, sub) if sub else path, message))
    return obj


def to_plain(value: Any) -> Any:
    """Dataclasses/specs/tuples -> plain dicts and lists (YAML-safe)."""
    if isinstance(value, Spec):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
