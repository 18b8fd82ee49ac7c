"""The search's parent run is created once, however many workers start a new search together; the budget's hours
count across invocations and overlapping workers once."""

from __future__ import annotations

import threading
import time

import pytest

from tests.search.conftest import cli, search_experiment

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _open(tmp_path, new_store):
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.runner import tracking as tr
    from rcnn_lab.search import study as st

    uri = new_store(tmp_path)
    exp = load_experiment(search_experiment(tmp_path))
    c = tr.client(uri)
    exp_id = tr.experiment_id(c, exp.tracking_name, tr.default_artifact_root(uri))
    return exp, uri, c, exp_id, st.storage_url(exp.search, uri)


def _parents(c, exp_id):
    return c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'search'")


def test_workers_starting_a_new_search_together_create_one_parent_run(tmp_path, new_store, monkeypatch):
    from mlflow import MlflowClient

    from rcnn_lab.search import study as st

    exp, uri, c, exp_id, url = _open(tmp_path, new_store)
    st.open_study(exp, url)  # the study exists (create_study is already safe); its parent run does not yet
    create = MlflowClient.create_run

    def slow_create(self, *args, **kwargs):  # widen the window between reading the attr and setting it
        time.sleep(0.5)
        return create(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", slow_create)
    start, got, errors = threading.Barrier(3), [], []

    def worker():
        try:
            study = st.open_study(exp, url)
            start.wait()
            got.append(st.parent_run(MlflowClient(uri), exp_id, exp, study, url, {}))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 3
    assert len(set(got)) == 1
    (parent,) = _parents(c, exp_id)
    assert parent.info.run_id == got[0] == st.open_study(exp, url).user_attrs[st.PARENT_ATTR]
    # the claims are dropped: the storage holds the search's study only
    import optuna

    assert [s.study_name for s in optuna.get_all_study_summaries(st.storage(url))] == [st.study_name(exp)]


def test_a_deleted_parent_run_is_replaced_once(tmp_path, new_store):
    from rcnn_lab.search import study as st

    exp, uri, c, exp_id, url = _open(tmp_path, new_store)
    study = st.open_study(exp, url)
    first = st.parent_run(c, exp_id, exp, study, url, {})
    assert st.parent_run(c, exp_id, exp, study, url, {}) == first  # a later invocation adopts it
    c.delete_run(first)
    second = st.parent_run(c, exp_id, exp, study, url, {})
    assert second != first and study.user_attrs[st.PARENT_ATTR] == second


def test_a_claim_left_by_a_dead_process_is_dropped(tmp_path, new_store, monkeypatch):
    import subprocess
    import sys

    from optuna.study import StudyDirection

    from rcnn_lab.search import study as st

    exp, uri, c, exp_id, url = _open(tmp_path, new_store)
    study = st.open_study(exp, url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage = st.storage(url)
    claim = storage.create_new_study([StudyDirection.MINIMIZE], study_name=f"{study.study_name}:parent:none")
    storage.set_study_user_attr(claim, "host", __import__("socket").gethostname())
    storage.set_study_user_attr(claim, "pid", dead.pid)
    monkeypatch.setattr(st, "CLAIM_WAIT_S", 30)
    began = time.time()
    run_id = st.parent_run(c, exp_id, exp, study, url, {})
    assert time.time() - began < 20 and study.user_attrs[st.PARENT_ATTR] == run_id


def test_spent_time_is_the_union_of_the_invocations_intervals():
    from rcnn_lab.search.driver import WALL, spent_s

    assert spent_s({}) == 0
    # two invocations one after the other add up; a second worker overlapping the first counts once
    attrs = {f"{WALL}a": [0.0, 100.0], f"{WALL}b": [50.0, 120.0], f"{WALL}c": [200.0, 260.0], "other": [0, 1e9]}
    assert spent_s(attrs) == 120.0 + 60.0
    assert spent_s({f"{WALL}a": [0.0, 100.0], f"{WALL}b": [10.0, 20.0]}) == 100.0  # one inside another


def test_budget_hours_count_across_invocations(tmp_path, new_store):
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.search import study as st
    from rcnn_lab.search.driver import WALL, spent_s

    new_store(tmp_path)
    path = search_experiment(tmp_path, budget="  budget: {trials: 5, hours: 0.5}\n")
    exp = load_experiment(path)
    url = st.storage_url(exp.search, f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    now = time.time()
    st.open_study(exp, url).set_user_attr(f"{WALL}earlier:1:0", [now - 7200, now - 5400])  # 30 min spent before
    code, out, err = cli("search", str(path), "--no-progress", "--no-confirm")
    assert code == 0, err + out
    study = st.open_study(exp, url)
    assert study.get_trials() == []  # nothing trained: the half hour was spent by the earlier invocation
    assert "budget.hours spent (0.5 h of 0.5 h, all invocations together)" in out
    walls = [k for k in study.user_attrs if k.startswith(WALL)]
    assert len(walls) == 2 and spent_s(study.user_attrs) >= 1800  # this invocation's interval is recorded too
    code, out, _ = cli("search", str(path), "--dry-run")
    assert code == 0 and "time spent: 0.5 h of 0.5 h" in out
