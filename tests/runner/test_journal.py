"""``runner.journal``: tracking writes on disk first, stored in order, through outages (real sqlite store)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from rcnn_lab.runner import journal as jr
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.journal import Journal, JournalBusy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Flapping:
    """A real client whose store does not answer while ``down`` is set (each call raises what requests raises,
    after ``hang_s`` or as soon as ``release`` is set: MLflow retrying a refused connection).
    ``hanging``: a failing call is in its hang now."""

    def __init__(self, c, hang_s: float = 0.0):
        self.c, self.hang_s, self.down, self.failures = c, hang_s, threading.Event(), 0
        self.release, self.hanging = threading.Event(), threading.Event()

    def __getattr__(self, name):
        attr = getattr(self.c, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down.is_set():
                self.failures += 1
                self.hanging.set()
                try:
                    self.release.wait(self.hang_s)
                finally:
                    self.hanging.clear()
                raise requests.exceptions.ConnectionError("HTTPConnectionPool: Max retries exceeded: Connection refused")
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def store(tmp_path, new_store):
    """-> (flapping client, run id) on a fresh sqlite store."""
    c = tr.client(new_store(tmp_path))
    run_id = c.create_run(tr.experiment_id(c, "journal", (tmp_path / "artifacts").as_uri())).info.run_id
    return Flapping(c), run_id


def _loss(step: int, value: float = 1.0) -> list[tuple]:
    return [("loss", value, 1_000 + step, step)]


def _steps(c, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_training_writes_go_on_through_an_outage_and_are_stored_once_when_the_store_returns(store, tmp_path):
    flap, run_id = store
    j = Journal(flap, run_id, tmp_path / "tracking", retry_s=0.05)
    flap.down.set()
    for step in range(1, 21):  # the store is down: every write still returns at once, onto the disk
        j.metrics(_loss(step), step_metrics=True)
    assert not j.wait_stored(timeout=30)  # returns as soon as the outage is seen, not when the store returns
    assert j.outage is not None and j.outage[1] == "connection refused"
    assert len((tmp_path / "tracking" / "journal.jsonl").read_text().splitlines()) == 20
    assert flap.c.get_metric_history(run_id, "loss") == []
    _wait_for(lambda: flap.failures >= 3)  # it keeps retrying
    j.metrics([("bbox_AP", 0.5, 2_000, 20)])
    j.end("FINISHED")
    flap.down.clear()
    backlog = j.close(outage_wait_s=30)
    assert not backlog.unstored and backlog.dropped == 0
    assert _steps(flap.c, run_id) == list(range(1, 21))  # each step exactly once, in the store
    assert flap.c.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "tracking").exists()  # everything stored: nothing left on disk


def test_the_journal_is_bounded_by_dropping_per_step_metrics_only(store, tmp_path):
    flap, run_id = store
    line = len(json.dumps({"op": "metrics", "m": [["loss", 1.0, 1_001, 1]]}, separators=(",", ":"))) + 1
    j = Journal(flap, run_id, tmp_path / "tracking", max_bytes=10 * line + 5, retry_s=0.05)  # steps 1-10 fit
    flap.down.set()
    for step in range(1, 31):
        j.metrics(_loss(step), step_metrics=True)
    j.metrics([("bbox_AP", 0.5, 2_000, 30)])  # an evaluation: kept past the bound
    j.end("FINISHED")
    assert j.backlog().dropped == 20 and j.backlog().metrics == 11
    flap.down.clear()
    backlog = j.close(outage_wait_s=30)
    assert backlog.dropped == 20 and not backlog.unstored
    assert _steps(flap.c, run_id) == list(range(1, 11))
    assert _steps(flap.c, run_id, "bbox_AP") == [30] and flap.c.get_run(run_id).info.status == "FINISHED"


def test_a_store_still_down_at_the_end_leaves_a_journal_that_the_next_invocation_replays(store, tmp_path):
    flap, run_id = store
    where = tmp_path / "tracking"
    j = Journal(flap, run_id, where, retry_s=0.05)
    flap.down.set()
    for step in range(1, 6):
        j.metrics(_loss(step), step_metrics=True)
    j.text("per-class AP", "eval/per_class.json")
    j.tags({"rcnn_lab.error": "none"})
    j.end("FINISHED")
    backlog = j.close(outage_wait_s=0.2)
    assert backlog.unstored and (backlog.metrics, backlog.files, backlog.tags, backlog.end) == (5, 1, 1, "FINISHED")
    assert "connection refused" in backlog.outage and backlog.since is not None
    assert "5 metric points, 1 files, 1 tag writes, its end (FINISHED)" == backlog.describe()
    assert (where / "journal.jsonl").exists() and flap.c.get_run(run_id).info.status == "RUNNING"
    with pytest.raises(ConnectionError):  # still down: the replay stops, the rest stays on disk
        jr.replay(flap, where)
    assert (where / "journal.jsonl").exists()
    flap.down.clear()
    stored = jr.replay(flap, where)
    assert stored.metrics == 5 and stored.end == "FINISHED"
    run = flap.c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["rcnn_lab.error"] == "none"
    assert _steps(flap.c, run_id) == [1, 2, 3, 4, 5]
    assert [a.path for a in flap.c.list_artifacts(run_id, "eval")] == ["eval/per_class.json"]
    assert not where.exists() and jr.replay(flap, where) is None


def test_a_write_the_store_refuses_is_counted_and_does_not_hold_up_the_rest(store, tmp_path):
    flap, run_id = store
    j = Journal(flap, run_id, tmp_path / "tracking", retry_s=0.05)
    j.artifact(tmp_path / "gone.txt", "eval")  # no such file: refused, not retried
    j.metrics(_loss(1))
    j.end("FINISHED")
    backlog = j.close(outage_wait_s=5)
    assert not backlog.unstored and backlog.rejected == 1 and "gone.txt" in backlog.reason
    assert _steps(flap.c, run_id) == [1] and flap.c.get_run(run_id).info.status == "FINISHED"


def test_a_journal_has_one_owner(store, tmp_path):
    flap, run_id = store
    j = Journal(flap, run_id, tmp_path / "tracking")
    with pytest.raises(JournalBusy):  # another worker (or this one) already writes it
        Journal(flap, run_id, tmp_path / "tracking")
    assert jr.replay(flap, tmp_path / "tracking") is None  # a live journal is never replayed by someone else
    j.close(0)


def test_writes_after_a_kill_are_read_back_and_a_torn_last_line_is_cut(store, tmp_path):
    flap, run_id = store
    where = tmp_path / "tracking"
    j = Journal(flap, run_id, where, start=False)  # never shipped: as if killed before the store was written
    for step in range(1, 4):
        j.metrics(_loss(step))
    j._owner.close()  # the process is gone: its lock with it
    with open(where / "journal.jsonl", "a") as f:
        f.write('{"op":"metrics","m":[["loss"')  # killed mid-write
    resumed = Journal(flap, run_id, where, start=False)  # the run resumes: its next write starts a line of its own
    resumed.metrics(_loss(4))
    resumed._owner.close()
    stored = jr.replay(flap, where)
    assert stored.metrics == 4 and _steps(flap.c, run_id) == [1, 2, 3, 4]
