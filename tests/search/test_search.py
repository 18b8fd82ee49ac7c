"""A tiny real search: trials are ordinary runs nested under the search's parent run, tagged with their trial;
finished configs are reused by config hash; the pruner's decision stops a run (KILLED, checkpoint kept);
the seeded sampler proposes the same sequence for the same history."""

from __future__ import annotations

import pytest

from tests.search.conftest import cli, search_experiment

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _store(folder):
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{folder / 'store' / 'mlflow.db'}")
    return c, c.get_experiment_by_name("tiny").experiment_id


def _study(folder, exp_path):
    import optuna

    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.search import study as st

    exp = load_experiment(exp_path)
    return optuna.load_study(study_name=st.study_name(exp), storage=f"sqlite:///{folder / 'store' / 'optuna.db'}")


@pytest.mark.slow
def test_a_tiny_search_nests_tagged_trial_runs_under_its_parent(tmp_path, new_store):
    new_store(tmp_path)  # an empty store copied: MLflow's migrations run once a session
    exp = search_experiment(tmp_path, "  confirm: {top_k: 1, seeds: [0, 1]}\n")
    code, out, err = cli("search", str(exp), "--no-progress", "--export", str(tmp_path / "best.yaml"))
    assert code == 0, err + out
    c, exp_id = _store(tmp_path)
    (parent,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'search'")
    assert parent.info.status == "FINISHED"
    study = _study(tmp_path, exp)
    assert parent.data.tags["rcnn_lab.study"] == study.study_name
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    children = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    for t in trials:  # each trial records its run and each run its trial
        run = c.get_run(t.user_attrs["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["rcnn_lab.trial"] == str(t.number) and run.data.tags["rcnn_lab.trial_state"] == "complete"
        assert run.data.tags["rcnn_lab.config_hash"] == t.user_attrs["config_hash"]
        assert run.data.tags["rcnn_lab.variant"] == f"trial-{t.number:04d}"
        assert t.values == [run.data.metrics["final/segm_AP50"]]
        assert float(run.data.params["train.optimizer.lr"]) == t.params["train.optimizer.lr"]
    stages = sorted(r.data.tags.get("rcnn_lab.search_stage") for r in children)
    # 2 trials, the baseline on seeds 0 and 1, the top trial on seed 1 (its seed 0 is its trial run, reused)
    assert stages == ["baseline", "baseline", "confirm", "trial", "trial"]
    assert "confirmation (seeds 0, 1)" in out and "| default" in out
    best = (tmp_path / "best.yaml").read_text()
    assert "search: null" in best and "lr:" in best and f"base: {exp.name}" in best
    # rcnn-lab report on the search experiment: its trials and confirmation tables, and the search's plots
    code, out, err = cli("report", str(exp), "--out", str(tmp_path / "rep"), "--no-log")
    assert code == 0, err
    assert f"Search {study.study_name}: trials" in out and f"Search {study.study_name}: confirmation" in out
    assert (tmp_path / "rep" / "report_search" / "search_history.png").is_file()
    # the same command again: the budget is spent, nothing is trained
    code, out, err = cli("search", str(exp), "--no-progress")
    assert code == 0, err
    assert "run    " not in out and len(c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")) == 5
    assert len(_study(tmp_path, exp).get_trials()) == 2


@pytest.mark.slow
def test_finished_runs_of_an_ordinary_sweep_are_reused_by_config_hash(tmp_path, new_store):
    space = """search:
  space:
    train.optimizer.lr: {choice: [0.01, 0.02]}
  objective: {segm_AP50: max}
  sampler: {type: grid, seed: 0}
"""
    new_store(tmp_path)
    exp = search_experiment(tmp_path, space=space, budget="  budget: {trials: 5}\n")
    code, _, err = cli("run", str(exp), "--no-progress")  # the base config: lr 0.01
    assert code == 0, err
    c, exp_id = _store(tmp_path)
    (sweep_run,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")
    code, out, err = cli("search", str(exp), "--no-progress")
    assert code == 0, err + out
    trials = _study(tmp_path, exp).get_trials()
    assert len(trials) == 2  # the grid has 2 points: it ends there, before the 5-trial budget
    reused = next(t for t in trials if t.params["train.optimizer.lr"] == 0.01)
    assert reused.user_attrs["run_id"] == sweep_run.info.run_id and reused.user_attrs["reused_run"] is True
    assert out.count("run    ") == 1  # only lr 0.02 trained
    assert len(c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")) == 2
    # rcnn-lab report attaches the report, the search's plots and tables included, to the search's parent run,
    # not to the ordinary sweep's run
    code, out, err = cli("report", str(exp), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    (search_run,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'search'")
    (sweep,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'sweep'")
    attached = {a.path for a in c.list_artifacts(search_run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/search_history.png"} <= attached
    assert search_run.info.run_id in err and sweep.info.run_id not in err
    assert c.list_artifacts(sweep.info.run_id, "report") == []


@pytest.mark.slow
def test_a_pruned_trial_is_recorded_with_its_iteration_and_keeps_its_checkpoint(tmp_path, monkeypatch, new_store):
    import optuna

    from rcnn_lab.engine import checkpoint as ckpt

    new_store(tmp_path)
    exp = search_experiment(tmp_path, "  pruner: {type: asha, min_iterations: 1}\n", iterations=4,
                            train="  eval_every: 2\n", budget="  budget: {trials: 1}\n")
    monkeypatch.setattr(optuna.pruners.SuccessiveHalvingPruner, "prune", lambda self, study, trial: True)
    code, out, err = cli("search", str(exp), "--no-progress")
    assert code == 0, err + out
    (trial,) = _study(tmp_path, exp).get_trials()
    assert trial.state.name == "PRUNED" and trial.user_attrs["iteration"] == 2 and trial.intermediate_values.keys() == {2}
    c, _ = _store(tmp_path)
    run = c.get_run(trial.user_attrs["run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["rcnn_lab.stopped_at"] == "2" and run.data.tags["rcnn_lab.trial_state"] == "pruned"
    folders = list((tmp_path / "store" / "outputs" / "tiny").glob("*"))
    assert [p.name for f in folders for p in ckpt.saved(ckpt.folder(f))] == [ckpt.path_for(folders[0], 2).name]


def _sequence(exp, seed: int, n: int = 6) -> list[dict]:
    """Params proposed by driver._ask on an in-memory study, each told a value derived from its params."""
    import dataclasses

    import optuna

    from rcnn_lab.search import driver, space
    from rcnn_lab.search import study as st

    search = dataclasses.replace(exp.search, sampler=dataclasses.replace(exp.search.sampler, seed=seed))
    exp = dataclasses.replace(exp, search=search)
    study = optuna.create_study(directions=st.directions(search), sampler=st.sampler(search, 0))
    s = driver.Search(exp, study, "memory", None, "0", "parent")
    out = []
    for _ in range(n):
        trial = driver._ask(s)
        params = space.suggest(trial, search.space)
        study.tell(trial, params["train.optimizer.lr"] * (2 if "32" in str(params["model.roi_heads.box_head"]) else 1))
        out.append(params)
    return out


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "nsga2"])
def test_the_seeded_sampler_proposes_the_same_sequence_for_the_same_history(tmp_path, sampler):
    import dataclasses

    from rcnn_lab.engine.preflight import load_experiment

    optuna_logs = pytest.importorskip("optuna")
    optuna_logs.logging.set_verbosity(optuna_logs.logging.ERROR)
    exp = load_experiment(search_experiment(tmp_path))
    exp = dataclasses.replace(exp, search=dataclasses.replace(
        exp.search, sampler=dataclasses.replace(exp.search.sampler, type=sampler)))
    first, again, other = _sequence(exp, 0), _sequence(exp, 0), _sequence(exp, 1)
    assert first == again
    assert first != other
    if sampler != "nsga2":  # NSGA-II's offspring may inherit a parent's value
        assert len({p["train.optimizer.lr"] for p in first}) == len(first)  # no repeated proposal


def test_the_confirmation_says_when_it_disagrees_with_the_single_seed_ranking():
    import pandas as pd

    from rcnn_lab.report.search import disagrees

    def table(confirmed, single):
        rows = [{"variant": "default", "baseline": True, "rank": float("nan"), "single_rank": float("nan")}]
        rows += [{"variant": f"trial-000{i}", "baseline": False, "rank": r, "single_rank": s}
                 for i, (r, s) in enumerate(zip(confirmed, single))]
        return pd.DataFrame(rows)

    assert not disagrees(table([1, 2, 3], [1, 2, 3]))
    assert disagrees(table([2, 1, 3], [1, 2, 3]))  # the single-seed winner is second once confirmed
    assert not disagrees(pd.DataFrame())
