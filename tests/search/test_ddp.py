"""``search --nproc 2``: each trial and the confirmation stage train on two local DDP ranks, logged once
under the search's parent run; what --nproc cannot do with a search is refused in one line."""

from __future__ import annotations

import pytest

from tests.runner.conftest import cli_fd
from tests.search.conftest import cli, search_experiment

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.slow
def test_trials_and_the_confirmation_train_on_two_ranks_logged_once(tmp_path, new_store, monkeypatch, capfd):
    import optuna
    from mlflow import MlflowClient

    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.search import study as st

    new_store(tmp_path)  # an empty store copied: MLflow's migrations run once a session
    exp = search_experiment(tmp_path, "  confirm: {top_k: 1, seeds: [0, 1]}\n", budget="  budget: {trials: 1}\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks' threads, as the other tests' processes
    # the search process is this one (its ranks are processes of their own, writing to its stdout and stderr)
    code, out, err = cli_fd(capfd, "search", str(exp), "--nproc", "2", "--no-progress")
    assert code == 0, out + err
    study = optuna.load_study(study_name=st.study_name(load_experiment(exp)),
                              storage=f"sqlite:///{tmp_path / 'store' / 'optuna.db'}")
    (trial,) = study.get_trials()
    assert trial.state.name == "COMPLETE"
    c = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name("tiny").experiment_id
    (parent,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'search'")
    runs = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")
    # the trial (seed 0), the baseline on seeds 0 and 1, the trial's config on seed 1: one run each, not one per rank
    assert sorted((r.data.tags["rcnn_lab.search_stage"], r.data.tags["rcnn_lab.seed"]) for r in runs) == [
        ("baseline", "0"), ("baseline", "1"), ("confirm", "1"), ("trial", "0")]
    assert all(r.info.status == "FINISHED" and r.data.tags["rcnn_lab.world_size"] == "2" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    (own,) = [r for r in runs if r.data.tags["rcnn_lab.search_stage"] == "trial"]
    assert trial.user_attrs["run_id"] == own.info.run_id and trial.values == [own.data.metrics["final/segm_AP50"]]
    assert own.data.tags["rcnn_lab.trial"] == "0" and own.data.tags["rcnn_lab.trial_state"] == "complete"


@pytest.mark.parametrize("extra, flags, words", [
    ("  pruner: {type: asha, min_iterations: 1}\n", ["--nproc", "2"], ["--nproc", "pruner", "pruner.type: none"]),
    ("", ["--nproc", "2", "--parallel", "2"], ["--nproc", "cannot be combined with --parallel"]),
    ("", ["--nproc", "0"], ["--nproc", "must be >= 1"]),
    ("", ["--rank-of", "trial:0"], ["--rank-of", "search --nproc"]),
])
def test_what_nproc_cannot_do_is_one_line_and_writes_nothing(tmp_path, extra, flags, words):
    train = "  eval_every: 1\n" if "asha" in extra else ""
    exp = search_experiment(tmp_path, extra, train=train)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = cli("search", str(exp), *flags)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
