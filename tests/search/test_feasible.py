"""``search.constraints``: feasible trials rank first (the feasible Pareto front, then the first objective),
infeasible ones by how far they miss; the same violations are Optuna's constraints of the told trial."""

from __future__ import annotations

import pytest

from rcnn_lab.config.search import Bound, SearchConfig
from rcnn_lab.search import feasible

optuna = pytest.importorskip("optuna")


def _search(objective: dict, constraints: dict | None = None, sampler: str = "tpe") -> SearchConfig:
    from rcnn_lab.config.search import Budget, ConfirmConfig, Param, PrunerConfig, SamplerConfig

    return SearchConfig((Param("train.optimizer.lr", "float", 1e-3, 1e-2),), objective, Budget(), SamplerConfig(sampler),
                        PrunerConfig(), ConfirmConfig(), None, "exp.yaml", constraints or {})


def _trial(number: int, values: list[float], **attrs):
    from optuna.distributions import FloatDistribution

    t = optuna.trial.create_trial(values=values, params={"train.optimizer.lr": 0.005},
                                  distributions={"train.optimizer.lr": FloatDistribution(1e-3, 1e-2)}, user_attrs=attrs)
    t.number = number
    return t


def test_feasible_front_first_by_the_first_objective_then_infeasible_by_miss():
    s = _search({"train_time_s": "min", "segm_AP50": "max"}, {"segm_AP50": Bound(min=0.85)})
    trials = [_trial(0, [100, 0.86]), _trial(1, [80, 0.84]), _trial(2, [120, 0.90]), _trial(3, [130, 0.87]),
              _trial(4, [90, 0.50]), _trial(5, [60, 0.849])]
    # 3 is dominated by 2 (slower, lower AP); 5 misses by 0.001, 1 by 0.01, 4 by 0.35
    assert [t.number for t in feasible.ranked(s, trials)] == [0, 2, 3, 5, 1, 4]
    # without the constraint: the front (1 is dominated by 5, 3 by 2) by time, then the rest by time
    assert [t.number for t in feasible.ranked(_search(s.objective), trials)] == [5, 0, 2, 1, 4, 3]


def test_a_constraint_on_a_metric_that_is_not_an_objective_is_read_from_the_trial():
    s = _search({"train_time_s": "min"}, {"segm_AP50": Bound(min=0.5)})
    trials = [_trial(0, [10], **{feasible.METRICS: {"segm_AP50": 0.4}}),
              _trial(1, [20], **{feasible.METRICS: {"segm_AP50": 0.6}}),
              _trial(2, [5])]  # told before the constraint existed: its metric is unknown, so it ranks last
    assert [t.number for t in feasible.ranked(s, trials)] == [1, 0, 2]
    assert feasible.violations(s, trials[2]) == [float("inf")]


@pytest.mark.parametrize("kind", ["tpe", "nsga2"])
def test_a_told_trial_carries_optunas_constraints_and_best_trials_keep_the_feasible(kind):
    from rcnn_lab.search import study as st

    s = _search({"train_time_s": "min", "segm_AP50": "max"}, {"segm_AP50": Bound(min=0.85)}, kind)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=st.sampler(s, 0))
    for time_s, ap in ((50.0, 0.80), (90.0, 0.88)):  # the fast one misses the bound
        trial = study.ask()
        trial.suggest_float("train.optimizer.lr", 1e-3, 1e-2)
        feasible.record(s, trial, {"train_time_s": time_s, "segm_AP50": ap, "bbox_AP": 0.1})
        study.tell(trial, [time_s, ap])
    fast, slow = study.get_trials()
    assert fast.constraints == {"segm_AP50": pytest.approx(0.05)} and fast.user_attrs[feasible.METRICS] == {"segm_AP50": 0.8}
    assert slow.constraints == {"segm_AP50": pytest.approx(-0.03)}
    assert [t.number for t in study.best_trials] == [1]  # Optuna's own front: the infeasible trial is off it
    assert [t.number for t in feasible.ranked(s, study.get_trials())] == [1, 0]
    third = study.ask()  # the sampler proposes from constrained history
    assert 1e-3 <= third.suggest_float("train.optimizer.lr", 1e-3, 1e-2) <= 1e-2


def test_without_constraints_nothing_is_recorded():
    study = optuna.create_study()
    trial = study.ask()
    feasible.record(_search({"segm_AP50": "max"}), trial, {"segm_AP50": 0.5})
    study.tell(trial, 0.5)
    assert study.get_trials()[0].constraints == {} and feasible.METRICS not in study.get_trials()[0].user_attrs


def test_the_confirmed_ranking_puts_means_that_meet_the_constraints_first():
    import pandas as pd

    from rcnn_lab.report.search import confirmed_rank, missed

    s = _search({"train_time_s": "min", "segm_AP50": "max"}, {"segm_AP50": Bound(min=0.85)})
    tops = pd.DataFrame({"variant": ["trial-0003", "trial-0007", "trial-0009"],
                         "train_time_s_mean": [120.0, 90.0, 150.0], "segm_AP50_mean": [0.86, 0.84, 0.90]})
    # trial 7 is fastest but its mean misses the bound: it ranks after both that meet it
    assert confirmed_rank(s, tops) == [1, 3, 2]
    assert list(missed(s, tops).round(6)) == [0.0, 0.01, 0.0]
    assert confirmed_rank(_search(s.objective), tops) == [2, 1, 3]  # without the constraint: by time alone


def test_the_plots_mark_the_feasible_front_and_explain_each_objective(tmp_path):
    from types import SimpleNamespace

    from rcnn_lab.report.search import plots, trials

    s = _search({"train_time_s": "min", "segm_AP50": "max"}, {"segm_AP50": Bound(min=0.85)}, "random")
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        trial = study.ask()
        lr = trial.suggest_float("train.optimizer.lr", 1e-3, 1e-2)
        time_s, ap = 100 + 1e4 * lr, 0.95 - 20 * abs(lr - 0.004)  # cost follows lr; accuracy peaks at 0.004
        feasible.record(s, trial, {"train_time_s": time_s, "segm_AP50": ap})
        study.tell(trial, [time_s, ap])
    exp = SimpleNamespace(search=s)
    frame = trials(exp, study)
    assert list(frame["feasible"]) == [ap >= 0.85 for ap in frame["segm_AP50"]]
    names = {p.name for p in plots(exp, study, frame, tmp_path)}
    assert {"search_pareto.png", "search_importance.png", "search_importance_segm_AP50.png"} <= names
