"""The ``search:`` section of an experiment: a hyperparameter search over config keys, checked at load.

Pure like the rest of ``config``: every value a search may give a key (each bound, each choice) is
set into the experiment's baseline config and converted by the schema (component specs by the
``families`` the loader is handed), so a key that does not exist, a bound of the wrong type or out
of range, or a choice that is not a valid component fails at load, one line per mistake naming
``search.space.KEY.float|int|choice``. The objective is checked against the metrics a run logs
(``metrics``, supplied by the engine: evaluation and cost metrics).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rcnn_lab.config.schema import RunConfig
from rcnn_lab.config.types import Families, convert_dataclass
from rcnn_lab.errors import Problem, did_you_mean, excerpt

SAMPLERS = ("tpe", "random", "grid", "qmc", "nsga2")
KINDS = ("float", "int", "choice")


def _default(value):
    return field(default_factory=lambda: value)


@dataclass(frozen=True)
class Budget:
    trials: int | None = 20
    hours: float | None = None

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.trials is None and self.hours is None:
            out.append(("trials", "set trials and/or hours (the search ends at whichever comes first)"))
        if self.trials is not None and self.trials < 1:
            out.append(("trials", f"must be >= 1, got {self.trials}"))
        if self.hours is not None and not self.hours > 0:
            out.append(("hours", f"must be > 0, got {self.hours}"))
        return out


@dataclass(frozen=True)
class SamplerConfig:
    type: Literal["tpe", "random", "grid", "qmc", "nsga2"] = "tpe"
    seed: int = 0


@dataclass(frozen=True)
class PrunerConfig:
    type: Literal["asha", "none"] = "none"
    min_iterations: int = 1  # ASHA's min_resource: the first rung, in iterations
    reduction_factor: int = 3

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.min_iterations < 1:
            out.append(("min_iterations", f"must be >= 1, got {self.min_iterations}"))
        if self.reduction_factor < 2:
            out.append(("reduction_factor", f"must be >= 2, got {self.reduction_factor}"))
        return out


@dataclass(frozen=True)
class ConfirmConfig:
    top_k: int = 0  # 0: no confirmation stage
    seeds: list[int] = _default([])

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.top_k < 0:
            out.append(("top_k", f"must be >= 0 (0: no confirmation), got {self.top_k}"))
        if self.top_k and len(set(self.seeds)) < 2:
            out.append(("seeds", "needs at least 2 different seeds for the paired statistics (e.g. [0, 1, 2, 3, 4])"))
        return out


@dataclass(frozen=True)
class Bound:
    """A constraint on a metric a run logs: ``{min: x}``, ``{max: y}`` or both (inclusive)."""

    min: float | None = None
    max: float | None = None

    def check(self) -> list[tuple[str, str]]:
        out = []
        for name in ("min", "max"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not _is_number(v)):
                out.append((name, f"must be a finite number, got {v!r}"))
        if not out and self.min is None and self.max is None:
            out.append(("", "set min and/or max (e.g. {min: 0.85})"))
        if not out and self.min is not None and self.max is not None and not self.min < self.max:
            out.append(("", f"min ({self.min}) must be below max ({self.max})"))
        return out

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 when ``value`` satisfies the bound, else by how much it misses."""
        return max(self.min - value if self.min is not None else -math.inf,
                   value - self.max if self.max is not None else -math.inf)


@dataclass(frozen=True)
class SearchSection:
    """``search:`` as written (``space`` parsed separately into :class:`Param`)."""

    space: dict[str, dict]
    objective: dict[str, Literal["max", "min"]]
    budget: Budget = _default({})
    sampler: SamplerConfig = _default({})
    pruner: PrunerConfig = _default({})
    confirm: ConfirmConfig = _default({})
    constraints: dict[str, Bound] = _default({})  # metric -> bound: trials outside it are infeasible
    storage: str | None = None  # Optuna storage: an RDB URL, or journal:PATH; default sqlite beside the MLflow store


@dataclass(frozen=True)
class Param:
    """One searched key: ``float``/``int`` range (``step``, ``log``) or ``choice``."""

    key: str
    kind: str
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    choices: tuple = ()

    def values(self) -> list:
        """The values to check (bounds, or every choice); every value of an enumerable range for grids."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def grid(self) -> list:
        if self.kind == "choice":
            return list(self.choices)
        n = int(round((self.high - self.low) / self.step))
        return [self.low + i * self.step if self.kind == "int" else round(self.low + i * self.step, 12) for i in range(n + 1)]


@dataclass(frozen=True)
class SearchConfig:
    space: tuple[Param, ...]
    objective: dict[str, str]  # metric -> max | min, in order
    budget: Budget
    sampler: SamplerConfig
    pruner: PrunerConfig
    confirm: ConfirmConfig
    storage: str | None
    file: str = ""
    constraints: dict[str, Bound] = field(default_factory=dict)  # not in the fingerprint: they rank, not define, trials

    def violations(self, metrics: dict) -> list[float] | None:
        """One value per constraint (<= 0: satisfied), or None when a constrained metric is missing."""
        if not all(m in metrics for m in self.constraints):
            return None
        return [b.violation(float(metrics[m])) for m, b in self.constraints.items()]

    def shortfall(self, metrics: dict) -> float:
        """By how much ``metrics`` miss the constraints in all (0: they meet them; inf: a constrained metric is missing)."""
        got = self.violations(metrics)
        return math.inf if got is None else sum(max(v, 0.0) for v in got)

    @property
    def fingerprint(self) -> str:
        """Hash of what makes a study: the space and the objective (budget, sampler, pruner may change on resume)."""
        blob = json.dumps([[p.key, p.kind, p.low, p.high, p.step, p.log, list(p.choices)] for p in self.space]
                          + [list(self.objective.items())], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _param(key: str, spec: Any, path: str, problems: list[Problem]) -> Param | None:
    if not isinstance(spec, dict):
        problems.append(Problem(path, f"expected {{float: [low, high]}}, {{int: [low, high]}} or {{choice: [...]}}, "
                                      f"got {excerpt(spec)}"))
        return None
    kinds = [k for k in KINDS if k in spec]
    extra = [k for k in spec if k not in (*KINDS, "log", "step")]
    if len(kinds) != 1 or extra:
        bad = extra[0] if extra else None
        hint = f"unknown key {bad!r}{did_you_mean(str(bad), [*KINDS, 'log', 'step'])}" if bad else f"has {len(kinds)} kinds"
        problems.append(Problem(path, f"{hint}; write exactly one of float: [low, high], int: [low, high], choice: [...]"
                                      " (with log: true / step: N for ranges)"))
        return None
    kind = kinds[0]
    at = f"{path}.{kind}"
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            problems.append(Problem(at, f"must be a non-empty list of values, got {excerpt(choices)}"))
            return None
        texts = [json.dumps(c, sort_keys=True, default=str) for c in choices]
        if len(set(texts)) != len(texts):
            problems.append(Problem(at, "lists a value twice; list each choice once"))
            return None
        if "log" in spec or "step" in spec:
            problems.append(Problem(path, "log and step apply to float/int ranges, not to choice; remove them"))
            return None
        return Param(key, kind, choices=tuple(choices))
    bounds = spec[kind]
    number = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else _is_number
    if not isinstance(bounds, list) or len(bounds) != 2 or not all(number(b) for b in bounds):
        problems.append(Problem(at, f"must be [low, high] with two {kind}s, got {excerpt(bounds)}"))
        return None
    low, high = bounds
    if not low < high:
        problems.append(Problem(at, f"low ({low}) must be below high ({high}); for one value set the key itself"))
        return None
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        problems.append(Problem(f"{path}.log", f"expected true or false, got {excerpt(log)}"))
        return None
    if log and low <= 0:
        problems.append(Problem(at, f"log: true needs low > 0, got {low}; use a positive low bound or drop log"))
        return None
    if step is not None:
        if not number(step) or step <= 0:
            problems.append(Problem(f"{path}.step", f"must be a positive {kind}, got {excerpt(step)}"))
            return None
        if log:
            problems.append(Problem(f"{path}.step", "cannot be combined with log: true (Optuna samples one or the other)"))
            return None
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9:
            problems.append(Problem(f"{path}.step", f"{step} does not divide [{low}, {high}]; make high - low a multiple of it"))
            return None
    if kind == "int":
        step = 1 if step is None and not log else step
        return Param(key, kind, int(low), int(high), step, log)
    return Param(key, kind, float(low), float(high), float(step) if step is not None else None, log)


Setter = Callable[[dict, str, Any], None]  # the loader's set_dotted: the same merge rules as variants and --set


def _check_value(p: Param, which: str, value: Any, base: dict, setter: Setter, families: Families,
                 check: Callable[[RunConfig], list[Problem]] | None, path: str, problems: list[Problem]) -> None:
    data = copy.deepcopy(base)
    setter(data, p.key, copy.deepcopy(value))
    found: list[Problem] = []
    cfg = convert_dataclass(data, RunConfig, "", found, families)
    if cfg is not None and not found and check is not None and p.kind == "choice":
        found.extend(check(cfg))
    for f in found[:1]:  # one line per value: the first thing it breaks
        where = "" if f.path == p.key else f"{f.path}: "
        unknown = "unknown key" in f.message or "unknown argument" in f.message
        if unknown and (p.key == f.path or p.key.startswith(f.path + ".")):
            problems.append(Problem(path, f"{p.key} is not a key of the experiment's config ({f.path}: {f.message}); "
                                          "use a dotted key that `rcnn-lab inspect` shows"))
            return
        problems.append(Problem(f"{path}.{p.kind}", f"{which} {excerpt(value)}: {where}{f.message}; "
                                                    "use values valid for the key"))


def parse_search(raw: Any, base: dict, setter: Setter, families: Families, file: str,
                 check: Callable[[RunConfig], list[Problem]] | None = None,
                 metrics: Callable[[RunConfig], list[str]] | None = None,
                 baseline: RunConfig | None = None) -> tuple[SearchConfig | None, list[Problem]]:
    """``search:`` as written -> (SearchConfig, problems). ``base``: the baseline variant's plain config data."""
    problems: list[Problem] = []
    section = convert_dataclass(raw, SearchSection, "search", problems)
    if section is None or problems:
        return None, [Problem(p.path, p.message, file) for p in problems]
    space: list[Param] = []
    if not section.space:
        problems.append(Problem("search.space", "is empty; map dotted config keys to {float|int|choice: ...}"))
    keys = list(section.space)
    for key, spec in section.space.items():
        path = f"search.space.{key}"
        covered = [k for k in keys if k != key and key.startswith(k + ".")]
        if covered:
            problems.append(Problem(path, f"lies under searched key {covered[0]}; search one of the two"))
            continue
        p = _param(key, spec, path, problems)
        if p is None:
            continue
        for i, value in enumerate(p.values()):
            which = ("low", "high")[i] if p.kind != "choice" else f"choice [{i}]"
            before = len(problems)
            _check_value(p, which, value, base, setter, families, check, path, problems)
            if len(problems) > before:  # one line per key: its first value that does not fit
                break
        space.append(p)
    if not section.objective:
        problems.append(Problem("search.objective", "names no metric; e.g. {segm_AP50: max}"))
    if metrics is not None and baseline is not None:
        known = list(metrics(baseline))
        for section_name, names in (("objective", section.objective), ("constraints", section.constraints)):
            for name in names:
                if name not in known:
                    problems.append(Problem(f"search.{section_name}.{name}", f"is not a metric runs of this experiment "
                                            f"log{did_you_mean(name, known)} (e.g. {', '.join(known[:3])}, ..., gflops, "
                                            "train_time_s)"))
    if section.pruner.type != "none":
        if len(section.objective) > 1:
            problems.append(Problem("search.pruner.type", "pruning needs a single objective (Optuna does not prune "
                                    "multi-objective studies); use type: none or one objective"))
        if baseline is not None and baseline.train.eval_every <= 0:
            problems.append(Problem("search.pruner.type", f"{section.pruner.type} decides at the periodic evaluations; "
                                    "set train.eval_every (e.g. 100) or pruner type: none"))
    if section.sampler.type == "grid":
        for p in space:
            if p.kind == "float" and p.step is None:
                problems.append(Problem(f"search.space.{p.key}.float", "the grid sampler needs values it can list; "
                                        "add step: or use choice: [...]"))
    out = SearchConfig(tuple(space), dict(section.objective), section.budget, section.sampler, section.pruner,
                       section.confirm, section.storage, file, dict(section.constraints))
    return out, [Problem(p.path, p.message, file) for p in problems]
