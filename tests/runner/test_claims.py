"""Claims: two workers on one store never train the same config hash; stale claims are taken over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.runner import claims, tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.plan import make_plan
from tests.runner.conftest import tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HASH = "0123456789abcdef"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _store(tmp_path, new_store):
    uri = new_store(tmp_path)  # an empty store copied: MLflow's migrations run once a session
    c = tr.client(uri)
    return uri, c, tr.experiment_id(c, "claims", None)


def _claimed_run(c, exp_id, pid: int, beat: float, start_time: int | None = None, status: str | None = None) -> str:
    run_tags = {tags.CONFIG_HASH: HASH, tags.KIND: tags.VARIANT_RUN, tags.HOST: socket.gethostname(),
            tags.PID: str(pid), tags.HEARTBEAT: str(int(beat))}
    run_id = c.create_run(exp_id, start_time=start_time, tags=run_tags).info.run_id
    if status:
        c.set_terminated(run_id, status)
    return run_id


def test_oldest_live_claim_wins_and_both_sides_agree(tmp_path, new_store):
    _, c, exp_id = _store(tmp_path, new_store)
    now = time.time()
    _claimed_run(c, exp_id, _dead_pid(), now, start_time=1000)  # oldest, but its worker is gone: ignored
    other = _claimed_run(c, exp_id, os.getppid(), now, start_time=2000)  # a live worker
    mine = _claimed_run(c, exp_id, os.getpid(), now, start_time=3000)
    assert claims.rival(c, exp_id, HASH, mine).info.run_id == other  # we back off
    assert claims.rival(c, exp_id, HASH, other) is None  # the other worker, reading the same runs, goes on

    # same start_time: the smaller run id owns the hash, as seen from either side
    tie = [_claimed_run(c, exp_id, os.getppid(), now, start_time=500) for _ in range(2)]
    first, second = sorted(tie)
    assert claims.rival(c, exp_id, HASH, second).info.run_id == first
    assert claims.rival(c, exp_id, HASH, first) is None

    done = _claimed_run(c, exp_id, os.getppid(), now, start_time=100, status="FINISHED")
    assert claims.rival(c, exp_id, HASH, first).info.run_id == done  # a finished run beats every claim
    assert claims.rival(c, exp_id, HASH, first, finished_wins=False) is None  # --force


def test_backing_off_leaves_no_running_ghost(tmp_path, new_store):
    from mlflow.entities import ViewType

    _, c, exp_id = _store(tmp_path, new_store)
    now = time.time()
    other = _claimed_run(c, exp_id, os.getppid(), now, start_time=2000)
    mine = _claimed_run(c, exp_id, os.getpid(), now, start_time=3000)
    rival = claims.rival(c, exp_id, HASH, mine)
    claims.back_off(c, mine, rival)
    assert [r.info.run_id for r in tr.runs_with_hash(c, exp_id, HASH)] == [other]
    (ghost,) = c.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)
    assert (ghost.info.run_id, ghost.info.status) == (mine, "KILLED")
    assert ghost.data.tags[tags.BACKED_OFF_TO] == other


def test_a_claim_is_taken_over_by_exactly_one_worker(tmp_path, new_store):
    _, c, exp_id = _store(tmp_path, new_store)
    run_id = _claimed_run(c, exp_id, _dead_pid(), time.time() - 3600)
    seen_by_a, seen_by_b = c.get_run(run_id), c.get_run(run_id)  # both workers decided to resume it
    assert tr.claim_is_stale(seen_by_a)
    assert claims.take_over(c, seen_by_a) is True
    assert claims.take_over(c, seen_by_b) is False
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags[tags.PID] == str(os.getpid())
    assert not tr.claim_is_stale(run)
    assert claims.take_over(c, run) is True  # a later, different claim is a new key


@pytest.mark.slow
def test_hand_made_stale_claim_is_resumed_into(tmp_path, new_store):
    from rcnn_lab.runner.sweep import run_plan

    uri = new_store(tmp_path)
    exp = load_experiment(tiny_experiment(tmp_path, uri, name="stale", iterations=1))
    (planned,) = make_plan(exp)
    c = tr.client(uri)
    exp_id = tr.experiment_id(c, "stale", None)
    run_tags = {tags.CONFIG_HASH: planned.hash, tags.KIND: tags.VARIANT_RUN, tags.HOST: socket.gethostname(),
            tags.PID: str(_dead_pid()), tags.HEARTBEAT: str(int(time.time()))}
    stale = c.create_run(exp_id, tags=run_tags).info.run_id  # RUNNING, fresh heartbeat, but its process is gone
    lines: list[str] = []
    (outcome,) = run_plan(exp, [planned], progress=False, echo=lines.append)
    assert (outcome.action, outcome.status, outcome.run_id) == ("resume", "FINISHED", stale), lines
    runs = tr.runs_with_hash(c, exp_id, planned.hash)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(stale, "FINISHED")]
    assert "final/bbox_AP" in runs[0].data.metrics


@pytest.mark.slow
def test_two_processes_racing_on_one_plan_train_each_config_once(tmp_path, new_store, warm):
    uri = new_store(tmp_path)
    exp_file = tiny_experiment(tmp_path, uri, variants="  a: {}\n  b: {model.rpn.pre_nms_top_n.train: 80}\n", name="race",
                                iterations=1)
    c = tr.client(uri)  # an existing store (MLflow's sqlite schema creation is not itself safe to race)
    exp_id = tr.experiment_id(c, "race", None)
    cmd = [sys.executable, "-m", "rcnn_lab", "run", str(exp_file), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [warm.popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for planned in make_plan(load_experiment(exp_file)):
        runs = tr.runs_with_hash(c, exp_id, planned.hash)  # deleted (backed-off) runs are not listed
        assert [r.info.status for r in runs] == ["FINISHED"], (planned.label, outputs)
        trained = sum(f"run    {planned.label} ({planned.hash}) as run" in out for out in outputs)
        resumed = sum(f"resume {planned.label}" in out for out in outputs)
        assert trained + resumed == 1, outputs
