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


@pytest.fixture
def closed_port():
    """A port that refuses connections for the whole test: bound (so no other process, such as a neighbouring
    pytest-xdist worker's server, can take it) but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_user_hears_of_an_outage_while_the_first_write_still_hangs_dated_from_its_start(tmp_path, new_store,
                                                                                            monkeypatch, closed_port):
    monkeypatch.setattr(outage, "TICK_S", 0.05)
    c = tr.client(new_store(tmp_path))
    run_id = c.create_run(tr.experiment_id(c, "outage", (tmp_path / "artifacts").as_uri())).info.run_id
    slow_s = 0.3
    # the first write hangs until the test releases it (MLflow's retries, minutes in real life): no wall-clock
    # bound, so a loaded machine (a neighbouring test worker) cannot fail the test, and the line must come from
    # the watch's probe, not from the failure
    hanging, said = Flapping(c, hang_s=120.0), []
    url = f"http://127.0.0.1:{closed_port}"  # what the probe asks: a port nothing listens on
    with outage.Watch(url, said.append, wait_s=60, probe=lambda: tr.probe(url), slow_s=slow_s) as watch:
        j = Journal(hanging, run_id, tmp_path / "tracking", retry_s=0.05, watch=watch)
        hanging.down.set()
        first = time.time()
        j.metrics([("loss", 1.0, 1_000, 1)], step_metrics=True)
        _wait_for(lambda: said, timeout=60)
        heard = time.time()
        assert hanging.hanging.is_set() and hanging.failures == 1  # said while the first write still hangs
        (line,) = said
        assert line.startswith(f"tracking store {url} is not answering since {outage.clock(j.outage[0])} "
                               "(connection refused): training goes on")
        assert "waits up to 60 s" in line
        # dated from when the write started: at least slow_s before the watch asked the server and spoke
        assert first <= j.outage[0] <= heard - slow_s
        since = j.outage[0]
        hanging.release.set()  # the hanging write gives up; its retries fail at once from now on
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


def test_probe_says_why_a_server_does_not_answer_and_nothing_when_it_does(closed_port):
    assert tr.probe(f"http://127.0.0.1:{closed_port}") == "connection refused"
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
