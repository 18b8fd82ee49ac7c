"""Checks of an experiment's shape that no single field can make: seeds, override keys, variants x grid.

The loader (``config.loader``) calls these while it expands an experiment; each raises
``ConfigError`` with one line per problem (file or flag, dotted key, fix) or returns warnings.
The limits are stated in docs/configuration.md ("Limits").
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from rcnn_lab.config.schema import EXPERIMENT_KEYS, RunConfig
from rcnn_lab.config.types import INT_LIMIT
from rcnn_lab.errors import ConfigError, Problem, cut, excerpt

MAX_SEEDS = 1000  # seeds of one experiment (seeds: or --seeds); like variants x grid points (config.loader.MAX_VARIANTS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seeds(seeds: Any, key: str, source: str | None) -> list[int]:
    """``seeds`` as a list of 64-bit ints, at most :data:`MAX_SEEDS` of them; ``key`` names where they
    were written (``seeds`` in a file, or the ``--seeds`` flag)."""
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise ConfigError([Problem(key, f"must be a non-empty list of ints, got {excerpt(seeds)}", source)])
    if len(seeds) > MAX_SEEDS:
        raise ConfigError([Problem(key, f"lists {len(seeds):,} seeds; the limit is {MAX_SEEDS:,} (split the sweep "
                                   "into several invocations with --seeds)", source)])
    wide = next((s for s in seeds if not -INT_LIMIT < s < INT_LIMIT), None)
    if wide is not None:
        raise ConfigError([Problem(key, f"seed {excerpt(wide)} is out of range (64-bit integers); use a seed below 2**63",
                                   source)])
    return seeds


def experiment_seeds(raw: dict, parsed: list, seeds_file: str, seed_file: str, warnings: list[Problem]) -> list[int]:
    """The experiment's seeds: ``seeds:``, else ``train.seed`` (an override of it, ``--set train.seed=7``,
    takes effect). With ``seeds:`` in the file (``seeds_file``), ``train.seed`` is replaced: an override of
    it (``parsed``: (key, value, source) of ``--set`` and flags) is refused (``--seeds`` is the flag), one in a
    file (``seed_file``) is a warning."""
    over = [(v.get("seed") if k == "train" else v, s) for k, v, s in parsed
            if k == "train.seed" or (k == "train" and isinstance(v, dict) and "seed" in v)]
    if raw.get("seeds") is not None:
        seeds = check_seeds(raw["seeds"], "seeds", seeds_file)
        if over:
            raise ConfigError([Problem("train.seed", f"{seeds_file} lists seeds: {excerpt(seeds)}, which "
                                       "replace train.seed; choose seeds with --seeds N instead", over[-1][1])])
        if isinstance(raw.get("train"), dict) and "seed" in raw["train"]:
            warnings.append(Problem("train.seed", f"is replaced by seeds: {excerpt(seeds)}; remove it", seed_file))
        return seeds
    train = raw.get("train")
    seed = over[-1][0] if over else train.get("seed", 0) if isinstance(train, dict) else 0
    ok = _is_int(seed) and -INT_LIMIT < seed < INT_LIMIT
    return [seed if ok else 0]  # a bad seed: train.seed's error


def _sections(cls: type, prefix: str = "") -> set[str]:
    """Dotted paths of the schema's sections (dataclass fields: ``model``, ``model.roi_heads``, ...)."""
    out: set[str] = set()
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            path = f"{prefix}.{name}" if prefix else name
            out.add(path)
            out |= _sections(tp, path)
    return out


SECTIONS = frozenset(_sections(RunConfig))


def check_override_key(key: str, value: Any, source: str) -> None:
    """An override's dotted key (``--set``, a variant, a grid): no empty parts, no experiment-file keys,
    no ``null`` for a whole section (it would silently reset every key under it to its default)."""
    shown = cut(key)
    if key.split(".")[0] in EXPERIMENT_KEYS:
        top = key.split(".")[0]
        where = ("use --seeds 0,1,2 (it replaces the experiment's seeds:)" if top == "seeds" and source == "--set"
                 else f"write {top}: in the experiment file (it shapes the experiment, not a run's config)")
        raise ConfigError([Problem(shown, f"cannot be set as an override; {where}", source)])
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError([Problem("", f"override key {shown!r} has an empty part (between dots or at an end); "
                                   "write dotted.key=value, e.g. model.rpn.nms_thresh=0.6", source)])
    if value is None and key in SECTIONS:
        raise ConfigError([Problem(shown, f"is a whole section: null would reset every key under it to its default "
                                   f"(it cannot be removed); set keys under it instead, e.g. {key}.KEY=VALUE", source)])


def check_variants(named: list[tuple[str, dict]], grid: dict, file: str) -> None:
    """Refused in ``variants:`` and ``grid:``: a grid key a variant also sets (the grid would silently
    replace the variant's value); ``tracking.*`` (runs that differ only there share a config hash);
    ``train.seed`` (every variant runs every seed of ``seeds:``, which replace it)."""
    problems = []
    seed_fix = "every variant runs each seed of seeds:, which replace train.seed; list the seeds there or pass --seeds"
    for key in grid:
        if key == "train.seed":
            problems.append(Problem("grid.train.seed", seed_fix, file))
        if key == "tracking" or key.startswith("tracking."):
            problems.append(Problem(f"grid.{cut(key)}", "tracking settings are the same for every run of an "
                                    "experiment (runs differing only there share a config hash); set tracking: "
                                    "outside grid:, or write one experiment file per store", file))
    for name, over in named:
        for key in over:
            if key == "train.seed":
                problems.append(Problem(f"variants.{cut(name)}.train.seed", seed_fix, file))
                continue
            if not isinstance(key, str):
                continue
            if key == "tracking" or key.startswith("tracking."):
                problems.append(Problem(f"variants.{cut(name)}.{cut(key)}", "tracking settings are the same for every "
                                        "run of an experiment; set tracking: at the top level", file))
                continue
            clash = next((g for g in grid if g == key or g.startswith(f"{key}.") or key.startswith(f"{g}.")), None)
            if clash is not None:
                problems.append(Problem(f"variants.{cut(name)}.{cut(key)}", f"is also a grid: key ({cut(clash)}), "
                                        "whose values would replace the variant's; remove it from the variant or from "
                                        "grid:", file))
    if problems:
        raise ConfigError(problems)


def same_configs(hashes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(first name, later name) for each variant whose config hash equals an earlier variant's."""
    first: dict[str, str] = {}
    out = []
    for name, h in hashes:
        if h in first:
            out.append((first[h], name))
        else:
            first[h] = name
    return out
