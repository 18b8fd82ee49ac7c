"""One small registry per component family.

Factories register with a decorator; their signature *is* their config schema: YAML kwargs are
checked against parameter names and annotations when an experiment is loaded. Arguments the
model builder supplies (``in_channels``, ``num_classes``...) are declared with ``inject`` and
cannot be set from YAML.

A registry holds what has been registered so far: built-ins are registered by
``rcnn_lab.components.register_builtins`` (the layer above, which imports them), plugins by
``rcnn_lab.plugins``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rcnn_lab.config.types import Spec, convert
from rcnn_lab.errors import ConfigError, Problem, closest, did_you_mean, excerpt, join


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class Entry:
    """A registered factory."""

    name: str
    family: str
    factory: Callable
    inject: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return getattr(self.factory, "__module__", "?")

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.factory) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def params(self) -> list[Param]:
        """User-settable parameters (injected ones left out)."""
        sig = inspect.signature(self.factory)
        try:
            hints = typing.get_type_hints(self.factory, include_extras=True)
        except Exception:  # unresolvable annotations in a plugin: accept any value
            hints = {}
        out = []
        for p in sig.parameters.values():
            if p.name in self.inject or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            out.append(Param(p.name, hints.get(p.name, Any), p.default))
        return out


class Registry:
    """Name -> factory for one component family."""

    def __init__(self, family: str, inject: tuple[str, ...] = (), doc: str = ""):
        self.family = family
        self.inject = tuple(inject)
        self.doc = doc
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, *, inject: tuple[str, ...] = (), **meta: Any):
        """Decorator: ``@BOX_HEADS.register("two_mlp", inject=("in_channels",))``."""

        def deco(factory: Callable) -> Callable:
            key = name or factory.__name__
            if key in self._entries:
                prev = self._entries[key]
                raise ValueError(
                    f"{self.family} '{key}' is registered twice ({prev.source} and "
                    f"{getattr(factory, '__module__', '?')}); pick another name"
                )
            self._entries[key] = Entry(key, self.family, factory, self.inject + tuple(inject), dict(meta))
            return factory

        return deco

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, path: str = "") -> Entry:
        if name not in self._entries:
            raise ConfigError([Problem(path, self._unknown(name))])
        return self._entries[name]

    def _unknown(self, name: Any) -> str:
        names = sorted(self._entries)
        match = closest(str(name), names)
        hint = f"; closest match '{match}'" if match else ""
        return f"unknown {self.family} type {excerpt(str(name))}{hint}. Registered: {', '.join(names) or '(none)'}"

    def check_spec(self, value: Any, path: str, problems: list[Problem]) -> Spec | None:
        """Validate a ``{type: NAME, **kwargs}`` mapping against the factory signature."""
        if isinstance(value, Spec):
            value = value.to_dict()
        if isinstance(value, str):  # shorthand: just the type name
            value = {"type": value}
        if not isinstance(value, dict) or "type" not in value:
            problems.append(Problem(path, f"expected a {self.family} spec {{type: NAME, ...}}, got {excerpt(value)}"))
            return None
        name = value["type"]
        if not isinstance(name, str):
            problems.append(Problem(join(path, "type"), f"expected a {self.family} name (one of: "
                                    f"{', '.join(sorted(self._entries))}), got {excerpt(name)}"))
            return None
        if name not in self._entries:
            problems.append(Problem(join(path, "type"), self._unknown(name)))
            return None
        entry = self._entries[name]
        params = {p.name: p for p in entry.params()}
        kwargs = {}
        for key, val in value.items():
            if key == "type":
                continue
            if key in entry.inject:
                problems.append(Problem(join(path, key), f"is set by the model builder for {self.family} '{name}'; remove it"))
            elif key not in params:
                valid = ", ".join(params) or "(none)"
                problems.append(Problem(
                    join(path, key),
                    f"unknown argument for {self.family} '{name}'" + did_you_mean(key, params) + f" (valid: {valid})",
                ))
            else:
                kwargs[key] = convert(val, params[key].annotation, join(path, key), problems, registry_for)
        for p in params.values():
            if p.required and p.name not in kwargs:
                problems.append(Problem(join(path, p.name), f"required argument of {self.family} '{name}' is missing"))
        return Spec(name, kwargs)

    def build(self, spec: Spec, path: str = "", **injected: Any) -> Any:
        """Call the factory with the spec's kwargs plus the builder's injected arguments."""
        entry = self.get(spec.type, path)
        extra = {k: v for k, v in injected.items() if k in entry.inject}
        try:
            return entry.factory(**spec.kwargs, **extra)
        except ConfigError as exc:  # factories report relative keys; root them at the spec's path
            raise ConfigError([
                Problem(join(path, p.path) if p.path and path else (p.path or path), p.message, p.file)
                for p in exc.problems
            ]) from None


BACKBONES = Registry("backbone", doc="feature extractor returning an OrderedDict of feature maps with .out_channels")
ANCHOR_GENERATORS = Registry("anchor_generator", doc="anchors per feature map")
RPN_HEADS = Registry("rpn_head", inject=("in_channels", "num_anchors"), doc="objectness and box deltas per anchor")
ROI_POOLERS = Registry("roi_pooler", inject=("featmap_names",), doc="RoI features from multi-level feature maps")
BOX_HEADS = Registry("box_head", inject=("in_channels", "resolution"), doc="pooled RoI features -> box representation")
BOX_PREDICTORS = Registry("box_predictor", inject=("in_channels", "num_classes"), doc="class logits and box deltas")
MASK_HEADS = Registry("mask_head", inject=("in_channels",), doc="pooled RoI features -> mask features")
MASK_PREDICTORS = Registry("mask_predictor", inject=("in_channels", "num_classes"), doc="mask logits per class")
DATASETS = Registry("dataset", doc="images with boxes, labels and masks")
TRANSFORMS = Registry("transform", doc="training-time augmentation of image and target")
OPTIMIZERS = Registry("optimizer", inject=("params",), doc="torch optimizer")
LR_SCHEDULERS = Registry("lr_scheduler", inject=("optimizer", "total_iters"), doc="per-iteration learning-rate schedule")

FAMILIES: dict[str, Registry] = {
    r.family: r
    for r in (
        BACKBONES, ANCHOR_GENERATORS, RPN_HEADS, ROI_POOLERS, BOX_HEADS, BOX_PREDICTORS,
        MASK_HEADS, MASK_PREDICTORS, DATASETS, TRANSFORMS, OPTIMIZERS, LR_SCHEDULERS,
    )
}


def registry_for(family: str) -> Registry:
    return FAMILIES[family]

