"""Store resolution, heartbeats/claims and ``decide`` on real MLflow runs (sqlite in tmp)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.plan import make_plan
from rcnn_lab.runner.sweep import decide
from tests.runner.conftest import tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_uri_precedence_config_then_env_then_default(tmp_path, monkeypatch):
    assert tr.resolve_uri(None) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # cwd is tmp_path
    monkeypatch.setenv("RCNN_LAB_RUNS", str(tmp_path / "elsewhere"))
    assert tr.resolve_uri(None) == f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tr.resolve_uri(None) == "http://tracking.example:5000"
    assert tr.resolve_uri("sqlite:////data/m.db") == "sqlite:////data/m.db"  # tracking.uri wins


def test_outputs_and_artifacts_follow_the_store(tmp_path, monkeypatch):
    db = tmp_path / "s" / "mlflow.db"
    assert tr.runs_root(f"sqlite:///{db}") == tmp_path / "s"
    assert tr.default_artifact_root(f"sqlite:///{db}") == (tmp_path / "s" / "artifacts").as_uri()
    assert tr.runs_root("http://127.0.0.1:5000") == tr.DEFAULT_ROOT and tr.default_artifact_root("http://h:1") is None
    monkeypatch.setenv("RCNN_LAB_RUNS", str(tmp_path / "r"))
    assert tr.runs_root(f"sqlite:///{db}") == tmp_path / "r"


def test_quiet_mlflow_hides_info_but_keeps_warnings():
    import logging

    tr.quiet_mlflow()
    log = logging.getLogger("mlflow.store.db.utils")
    assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.WARNING)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, new_store):
    """One sqlite store (copied: creating one takes seconds) and one planned run for the module."""
    root = tmp_path_factory.mktemp("claims")
    (planned,) = make_plan(load_experiment(tiny_experiment(root, None)))
    return tr.client(new_store(root, "mlflow.db")), root, planned


@pytest.fixture
def store(shared, request):
    """-> (client, a fresh experiment's id, planned run)."""
    c, root, planned = shared
    return c, tr.experiment_id(c, request.node.name, (root / "artifacts").as_uri()), planned


def _run(c, exp_id, planned, status="RUNNING", **claim):
    run_tags = {tags.CONFIG_HASH: planned.hash, tags.KIND: tags.VARIANT_RUN}
    run_tags.update({getattr(tags, k.upper()): str(v) for k, v in claim.items()})
    r = c.create_run(exp_id, tags=run_tags)
    if status != "RUNNING":
        c.set_terminated(r.info.run_id, status)
    return c.get_run(r.info.run_id)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_decide_new_finished_and_force(store):
    c, exp_id, planned = store
    assert decide(c, exp_id, planned, force=False) == ("run", None)
    done = _run(c, exp_id, planned, "FINISHED")
    action, existing = decide(c, exp_id, planned, force=False)
    assert action == "skip" and existing.info.run_id == done.info.run_id
    assert decide(c, exp_id, planned, force=True) == ("run", None)


def test_decide_busy_for_a_live_claim_from_another_host(store):
    c, exp_id, planned = store
    r = _run(c, exp_id, planned, host="other-host", pid=12345, heartbeat=int(time.time()))
    action, existing = decide(c, exp_id, planned, force=False)
    assert action == "busy" and existing.info.run_id == r.info.run_id


def test_decide_resumes_a_stale_claim_from_another_host(store):
    c, exp_id, planned = store
    r = _run(c, exp_id, planned, host="other-host", pid=12345, heartbeat=int(time.time()) - tr.STALE_AFTER_S - 5)
    action, existing = decide(c, exp_id, planned, force=False)
    assert action == "resume" and existing.info.run_id == r.info.run_id


def test_decide_on_this_host_looks_at_the_pid(store):
    c, exp_id, planned = store
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        r = _run(c, exp_id, planned, host=socket.gethostname(), pid=live.pid, heartbeat=int(time.time()))
        assert decide(c, exp_id, planned, force=False)[0] == "busy"
    finally:
        live.kill()
        live.wait()
    c.set_tag(r.info.run_id, tags.PID, str(_dead_pid()))  # the worker died (kill -9): fresh beat, dead pid
    action, existing = decide(c, exp_id, planned, force=False)
    assert action == "resume" and existing.info.run_id == r.info.run_id


def test_decide_resumes_killed_but_reruns_failed(store):
    c, exp_id, planned = store
    killed = _run(c, exp_id, planned, "KILLED")
    action, existing = decide(c, exp_id, planned, force=False)
    assert action == "resume" and existing.info.run_id == killed.info.run_id
    time.sleep(0.01)
    _run(c, exp_id, planned, "FAILED")  # newest run failed: keep it as the record, start a fresh run
    assert decide(c, exp_id, planned, force=False) == ("run", None)


def test_heartbeat_thread_refreshes_the_tag(store):
    c, exp_id, planned = store
    r = _run(c, exp_id, planned, heartbeat=0)
    with tr.Heartbeat(c, r.info.run_id, every_s=0.05):
        deadline = time.time() + 10
        while c.get_run(r.info.run_id).data.tags[tags.HEARTBEAT] == "0" and time.time() < deadline:
            time.sleep(0.05)
    beat = c.get_run(r.info.run_id).data.tags[tags.HEARTBEAT]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", beat)  # a time a reader can read (UTC), not a raw number
    assert abs(tr.beat_time(beat) - time.time()) < 15


def test_heartbeats_read_back_in_both_forms_and_old_numeric_ones_still_count():
    assert tr.beat_time("2026-12-07T11:47:07Z") == 1796644027.0
    assert tr.beat_time("1796644027") == 1796644027.0 and tr.beat_time("garbage") is None and tr.beat_time(None) is None



OPEN_STORE = """
import sys, time
from rcnn_lab.runner import tracking as tr
while time.time() < float(sys.argv[2]):  # start together
    time.sleep(0.001)
c = tr.client(sys.argv[1])
print(tr.experiment_id(c, "race", None))
"""


def test_workers_starting_together_create_a_new_store_once(tmp_path, warm):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    start = time.time() + 3
    logs = [(tmp_path / f"worker{i}.out", tmp_path / f"worker{i}.err") for i in range(3)]
    procs = []
    for out, err in logs:
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(warm.popen([sys.executable, "-c", OPEN_STORE, uri, str(start)], stdout=o, stderr=e))
    for p in procs:
        p.wait(timeout=300)
    assert [p.returncode for p in procs] == [0, 0, 0], [err.read_text()[-2000:] for _, err in logs]
    ids = {out.read_text().strip() for out, _ in logs}
    assert len(ids) == 1  # one experiment, seen by every worker
    c = tr.client(uri)
    assert c.get_experiment_by_name("race").experiment_id in ids
    c.create_run(ids.pop())  # and the store is usable afterwards


def test_a_locked_store_is_reported_busy_not_a_bad_path(tmp_path, monkeypatch):
    import sqlalchemy.exc

    calls = []

    class Locked:
        def __init__(self, tracking_uri):
            pass

        def search_experiments(self, max_results):
            calls.append(1)
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    import mlflow

    monkeypatch.setattr(mlflow, "MlflowClient", Locked)
    monkeypatch.setattr(tr.time, "sleep", lambda s: None)
    with pytest.raises(tr.TrackingError) as info:
        tr.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    message = str(info.value)
    assert "is busy" in message and "retry in a moment" in message and "fix the path" not in message
    assert len(calls) == 5  # retried before giving up
