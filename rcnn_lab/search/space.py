"""A trial's parameters <-> its config: Optuna suggestions for ``search.space``, and the variant they make.

A trial's config is the experiment's baseline variant with the searched keys set by the same merge
rules as ``variants:`` and ``--set`` (``config.loader.set_dotted``), converted and checked by the
schema: its config hash is the one an ordinary sweep of the same settings has, so finished runs are
reused whichever command trained them.
"""

from __future__ import annotations

import json
from typing import Any

from rcnn_lab.config.loader import Experiment, Variant, config_hash, set_dotted
from rcnn_lab.config.schema import RunConfig
from rcnn_lab.config.search import Param
from rcnn_lab.config.types import convert_dataclass, to_plain
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.runner.plan import PlannedRun, weights_identity


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def labels(p: Param) -> list:
    """Optuna categorical values of a choice: the values themselves when all are scalars, else JSON text."""
    if all(_scalar(c) for c in p.choices):
        return list(p.choices)
    return [json.dumps(c, sort_keys=True) for c in p.choices]


def decode(p: Param, value: Any) -> Any:
    """An Optuna parameter value -> the config value."""
    if p.kind != "choice" or all(_scalar(c) for c in p.choices):
        return value
    return json.loads(value)


def grid_values(p: Param) -> list:
    return labels(p) if p.kind == "choice" else p.grid()


def suggest(trial, space: tuple[Param, ...]) -> dict[str, Any]:
    """Ask ``trial`` (an ``optuna.Trial``) for every searched key; an adopted trial returns its stored values."""
    out = {}
    for p in space:
        if p.kind == "float":
            v = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
        elif p.kind == "int":
            v = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            v = trial.suggest_categorical(p.key, labels(p))
        out[p.key] = decode(p, v)
    return out


def stored(space: tuple[Param, ...], params: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's Optuna params -> config values."""
    return {p.key: decode(p, params[p.key]) for p in space if p.key in params}


def variant_name(number: int) -> str:
    return f"trial-{number:04d}"


def configure(base: Variant, values: dict[str, Any], name: str) -> Variant:
    """``base`` with the dotted ``values`` set: a new variant (not the baseline) named ``name``."""
    from rcnn_lab.components import builtin_families

    data = to_plain(base.config)
    for key, value in values.items():
        set_dotted(data, key, value, {}, "search")
    problems: list[Problem] = []
    cfg = convert_dataclass(data, RunConfig, "", problems, builtin_families())
    if problems or cfg is None:
        raise ConfigError([Problem(f"search.space.{p.path}", p.message, base.file) for p in problems])
    return Variant(name, cfg, {**base.changed, **values}, baseline=False, sources=base.sources, file=base.file)


def planned(exp: Experiment, variant: Variant, seed: int | None = None) -> PlannedRun:
    """One run of ``variant`` (default: the experiment's first seed)."""
    s = exp.seeds[0] if seed is None else seed
    cfg = variant.with_seed(s)
    return PlannedRun(variant, s, cfg, config_hash(cfg, weights_identity(variant, exp.tracking.uri)))  # as make_plan


def trial_run(exp: Experiment, number: int, values: dict[str, Any]) -> PlannedRun:
    """Trial ``number``'s run: the baseline with ``values``, on the experiment's first seed."""
    return planned(exp, configure(exp.baseline, values, variant_name(number)))
