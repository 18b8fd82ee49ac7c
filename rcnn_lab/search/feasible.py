"""``search.constraints``: which trials are feasible, and the ranking that puts them first.

A constraint bounds a metric a run logs (``{segm_AP50: {min: 0.85}}``). Feasibility follows Optuna's
convention (one value per constraint, <= 0 satisfied) and is recorded on the trial with Optuna's own
``Trial.set_constraint`` before it is told, so TPE and NSGA-II steer their proposals towards the
feasible region, ``study.best_trials`` (and optuna-dashboard) count feasible trials only; the same values rank trials:
feasible ones first (on the Pareto front of the feasible ones first when there are several objectives,
then by the first objective), infeasible ones after them by how far they miss. The metrics a constraint
names are stored on the trial when it is told (user attr ``constraint_metrics``), so ranking needs only
the study.
"""

from __future__ import annotations

import math

from rcnn_lab.config.search import SearchConfig

METRICS = "constraint_metrics"  # trial user attr: {metric: value} of the constrained metrics


def stored(search: SearchConfig, metrics: dict) -> dict:
    """What a trial keeps of its run's final metrics: the constrained ones."""
    return {m: float(metrics[m]) for m in search.constraints if m in metrics}


def metrics_of(search: SearchConfig, trial) -> dict:
    got = dict(trial.user_attrs.get(METRICS) or {})
    for name, value in zip(search.objective, trial.values or ()):
        got.setdefault(name, value)
    return got


def violations(search: SearchConfig, trial) -> list[float]:
    """Per constraint, <= 0 when satisfied; a constrained metric the trial lacks counts as missed."""
    got = search.violations(metrics_of(search, trial))
    return got if got is not None else [math.inf] * len(search.constraints)


def feasible(search: SearchConfig, trial) -> bool:
    return all(v <= 0 for v in violations(search, trial))


def record(search: SearchConfig, trial, metrics: dict) -> None:
    """Before ``study.tell``: the constrained metrics (user attr) and their violations (Optuna's constraints)."""
    if not search.constraints:
        return
    got = stored(search, metrics)
    trial.set_user_attr(METRICS, got)
    for name, bound in search.constraints.items():
        value = got.get(name, math.nan)
        trial.set_constraint(name, math.inf if math.isnan(value) else bound.violation(value))


def _signs(search: SearchConfig) -> list[float]:
    return [-1.0 if d == "max" else 1.0 for d in search.objective.values()]


def front(search: SearchConfig, trials: list) -> list:
    """The non-dominated trials among ``trials`` (every objective at least as good, one better, dominates)."""
    signs = _signs(search)
    keyed = [(t, [s * v for s, v in zip(signs, t.values)]) for t in trials]

    def dominated(a: list[float]) -> bool:
        return any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a)) for _, b in keyed)

    return [t for t, k in keyed if not dominated(k)]


def ranked(search: SearchConfig, trials: list) -> list:
    """Completed trials, best first: feasible before infeasible; among the feasible, with several objectives, the
    Pareto front first; then by the first objective (trial number breaking ties); infeasible by total miss."""
    sign = _signs(search)[0]
    ok = [t for t in trials if feasible(search, t)]
    on_front = {t.number for t in front(search, ok)} if len(search.objective) > 1 else set()
    first = sorted(ok, key=lambda t: (t.number not in on_front, sign * t.values[0], t.number))
    rest = [t for t in trials if t.number not in {u.number for u in ok}]
    miss = sorted(rest, key=lambda t: (search.shortfall(metrics_of(search, t)), sign * t.values[0], t.number))
    return first + miss
