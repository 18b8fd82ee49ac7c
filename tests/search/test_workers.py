"""kill -9 in the middle of a search, then the same command: the killed trial resumes into its run, no trial
is lost or duplicated. Two workers on one search: no configuration trained twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcnn_lab.engine import checkpoint as ckpt
from tests.conftest import ROOT
from tests.runner.conftest import cli_fd, paused_env
from tests.search.conftest import cli, search_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RCNN_LAB_RUNS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def _checkpoints(folder: Path) -> list[Path]:
    return [p for run in (folder / "store" / "outputs" / "tiny").glob("*") for p in ckpt.saved(ckpt.folder(run))]


def _state(folder: Path, exp_path: Path):
    import optuna
    from mlflow import MlflowClient

    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.search import study as st

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=st.study_name(load_experiment(exp_path)),
                              storage=f"sqlite:///{folder / 'store' / 'optuna.db'}")
    c = MlflowClient(f"sqlite:///{folder / 'store' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "tags.`rcnn_lab.kind` = 'variant'")
    return study.get_trials(), runs


def test_kill_9_mid_search_then_rerun_resumes_the_trial_and_loses_or_repeats_nothing(tmp_path, new_store, warm):
    new_store(tmp_path)  # an empty store copied (MLflow's migrations run once a session), as below
    exp = search_experiment(tmp_path, iterations=4, train="  checkpoint_every: 2\n", pausable=True)
    proc = warm.popen([sys.executable, "-m", "rcnn_lab", "search", str(exp), "--no-progress"], cwd=tmp_path,
                      env=paused_env(_env(), 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not _checkpoints(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    first_out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, first_out
    trials, runs = _state(tmp_path, exp)
    assert [t.state.name for t in trials] == ["RUNNING"] and len(runs) == 1 and runs[0].info.status == "RUNNING"
    killed_run = runs[0].info.run_id

    code, out, err = cli("search", str(exp), "--no-progress")
    assert code == 0, err + out
    assert "trial 0: its process is gone; resuming it here" in out
    assert f"resume trial-0000 seed=0 ({trials[0].user_attrs['config_hash']}) into run {killed_run}" in out
    trials, runs = _state(tmp_path, exp)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the budget: 2 trials, none lost, none added
    assert trials[0].user_attrs["run_id"] == killed_run  # resumed into its own run
    assert sorted(r.data.tags["rcnn_lab.trial"] for r in runs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["rcnn_lab.config_hash"] for r in runs}) == len(runs) == 2
    # an uninterrupted search of the same file: the same trials (the runs are bit-reproducible on CPU)
    reference = tmp_path / "reference"
    new_store(reference)
    ref_exp = search_experiment(reference, iterations=4, train="  checkpoint_every: 2\n", pausable=True)
    code, _, err = cli("search", str(ref_exp), "--no-progress")
    assert code == 0, err
    ref_trials, ref_runs = _state(reference, ref_exp)
    assert [(t.params, t.values) for t in trials] == [(t.params, t.values) for t in ref_trials]
    assert sorted(r.data.tags["rcnn_lab.config_hash"] for r in runs) == sorted(r.data.tags["rcnn_lab.config_hash"]
                                                                                for r in ref_runs)


def test_two_workers_on_one_search_never_train_a_config_twice(tmp_path, new_store, monkeypatch, capfd):
    space = """search:
  space:
    model.roi_heads.box_head: {choice: [{type: two_mlp, representation_size: 32}, {type: two_mlp, representation_size: 64}]}
  objective: {segm_AP50: max}
  sampler: {type: random, seed: 0}
"""
    new_store(tmp_path)
    exp = search_experiment(tmp_path, space=space, budget="  budget: {trials: 4}\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, out, err = cli_fd(capfd, "search", str(exp), "--parallel", "2")  # the coordinator here, its workers processes
    assert code == 0, out + err
    trials, runs = _state(tmp_path, exp)
    hashes = [r.data.tags["rcnn_lab.config_hash"] for r in runs]
    assert len(hashes) == len(set(hashes)) <= 2  # two configs exist: each trained at most once
    counted = [t for t in trials if "void" not in t.user_attrs]
    assert len(counted) == 4 and all(t.state.name == "COMPLETE" for t in counted)
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2  # both workers asked for trials
    assert {t.user_attrs["run_id"] for t in counted} == {r.info.run_id for r in runs}
