"""``runner.outage``: the user hears within seconds that the store stopped answering, dated from the first failed write."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from rcnn_lab.runner import outage
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.journal import Journal
from tests.runner.test_journal import Flapping

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_user_hears_of_an_outage_within_seconds_dated_from_the_first_failed_write(tmp_path, new_store, monkeypatch):
    monkeypatch.setattr(outage, "TICK_S", 0.05)
    c = tr.client(new_store(tmp_path))
    run_id = c.create_run(tr.experiment_id(c, "outage", (tmp_path / "artifacts").as_uri())).info.run_id
    hanging, said = Flapping(c, hang_s=4.0), []
    url = f"http://127.0.0.1:{_closed_port()}"  # what the probe asks: a port nothing listens on
    with outage.Watch(url, said.append, wait_s=60, probe=lambda: tr.probe(url), slow_s=0.3) as watch:
        j = Journal(hanging, run_id, tmp_path / "tracking", retry_s=0.05, watch=watch)
        hanging.down.set()
        first = time.time()
        j.metrics([("loss", 1.0, 1_000, 1)], step_metrics=True)
        _wait_for(lambda: said)
        heard = time.time() - first
        assert heard < 2.5 and hanging.failures == 1  # long before the hanging write gave up (4 s)
        (line,) = said
        assert line.startswith(f"tracking store {url} is not answering since {outage.clock(j.outage[0])} "
                               "(connection refused): training goes on")
        assert "waits up to 60 s" in line
        assert first <= j.outage[0] <= first + 0.5  # when the write started, not when MLflow's retries ran out
        since = j.outage[0]
        for step in range(2, 5):
            j.metrics([("loss", 1.0, 1_000 + step, step)], step_metrics=True)
        _wait_for(lambda: hanging.failures >= 2)  # retried: the outage keeps the date of the first failure, said once
        assert j.outage[0] == since and len(said) == 1
        hanging.down.clear()
        _wait_for(lambda: len(said) == 2)
        assert said[1] == (f"tracking store {url} answers again (it did not from {outage.clock(since)}): "
                           "storing the kept writes")
        backlog = j.close(outage_wait_s=30)
    assert not backlog.unstored
    assert sorted(m.step for m in c.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]


def test_a_write_that_fails_at_once_is_said_at_once_without_a_probe(tmp_path, new_store):
    c = tr.client(new_store(tmp_path))
    run_id = c.create_run(tr.experiment_id(c, "outage", (tmp_path / "artifacts").as_uri())).info.run_id
    hanging, said = Flapping(c, hang_s=0.0), []
    with outage.Watch("sqlite:///x.db", said.append, wait_s=5) as watch:
        j = Journal(hanging, run_id, tmp_path / "tracking", retry_s=0.05, watch=watch)
        hanging.down.set()
        j.metrics([("loss", 1.0, 1_000, 1)], step_metrics=True)
        _wait_for(lambda: hanging.failures >= 5)
        assert len(said) == 1 and "is not answering since" in said[0]
        backlog = j.close(outage_wait_s=0)
    assert backlog.unstored and backlog.since == j.outage[0]


def test_probe_says_why_a_server_does_not_answer_and_nothing_when_it_does():
    assert tr.probe(f"http://127.0.0.1:{_closed_port()}") == "connection refused"
    assert tr.probe("sqlite:////tmp/x.db") is None  # a local store: nothing to ask

    class Health(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(self.status if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert tr.probe(url) is None
        Health.status = 503
        assert tr.probe(url + "/") == "HTTP 503"
    finally:
        server.shutdown()
        server.server_close()
