"""``rcnn-lab run`` against a real ``mlflow server`` over HTTP (artifacts proxied by the server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine.preflight import load_experiment
from tests.runner.conftest import cli, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _serve(root, backend: str, url: str):
    """Start ``mlflow server`` at ``url`` on ``backend`` and wait until it answers -> the process."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1",
         "--backend-store-uri", backend, "--artifacts-destination", (root / "served").as_uri()],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.time() + 240
    while not _answers(url):
        if proc.poll() is not None:
            tail = (root / "server.log").read_text().strip().splitlines()[-1:]
            pytest.skip(f"mlflow server cannot start here: {tail}")
        if time.time() > deadline:
            _stop(proc)
            pytest.fail(f"mlflow server did not answer within 240 s: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.25)
    return proc


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    """One ``mlflow server`` for the module (each start costs seconds of CPU), which a test may stop and start
    again on the same store and port."""

    def __init__(self, root, backend: str, url: str):
        self.root, self.backend, self.url = root, backend, url
        self.proc = _serve(root, backend, url)

    def stop(self) -> None:
        _stop(self.proc)

    def start(self) -> None:
        self.proc = _serve(self.root, self.backend, self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory, new_store):
    """The module's server; it always stops at the end."""
    root = tmp_path_factory.mktemp("server")
    served = Server(root, new_store(root), f"http://127.0.0.1:{_free_port()}")
    try:
        yield served
    finally:
        served.stop()


def test_run_logs_runs_metrics_and_artifacts_to_a_server(server, tmp_path):
    from mlflow import MlflowClient

    url, root = server.url, server.root
    exp = tiny_experiment(tmp_path / "e", url)
    code, out, err = cli("run", str(exp), "--no-progress")
    assert code == 0, err
    assert "View run" not in out  # MLflow's per-run URL lines are silenced
    c = MlflowClient(url)
    exp_id = c.get_experiment_by_name("tiny").experiment_id
    (child,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")
    parent = c.get_run(child.data.tags["rcnn_lab.sweep"])
    assert child.info.status == "FINISHED" and parent.data.tags["rcnn_lab.kind"] == "sweep"
    assert child.data.params["model.rpn.pre_nms_top_n.train"] == "100"
    assert [m.step for m in c.get_metric_history(child.info.run_id, "loss")] == [1, 2]
    assert "final/bbox_AP" in child.data.metrics and "final/segm_AP" in child.data.metrics
    # artifacts go through the server into its --artifacts-destination
    assert {"config.yaml", "model_summary.txt", "loss_curve.png", "eval"} <= {a.path for a in c.list_artifacts(child.info.run_id)}
    served = root / "served" / exp_id / child.info.run_id / "artifacts"
    assert (served / "eval" / "per_class.json").is_file() and (served / "config.yaml").is_file()
    # outputs (checkpoints) of a server store stay local: runs/ under the current folder
    final = ckpt.path_for(ckpt.FOLDER, load_experiment(exp).variants[0].config.train.iterations)
    assert list((tmp_path / "runs" / "outputs" / "tiny").glob(f"*/{final.as_posix()}"))

    code, out, _ = cli("run", str(exp), "--no-progress")  # the server knows it finished: skipped
    assert code == 0 and "skip   b seed=0" in out
    assert len(c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")) == 1


def test_a_server_that_stops_mid_training_and_returns_gets_every_step_while_training_goes_on(tmp_path, server,
                                                                                            monkeypatch):
    """The server is stopped after step 2 and started again after step 5: training never waits for it,
    the journal retries, and the run ends FINISHED with every step stored once."""
    from mlflow import MlflowClient

    from rcnn_lab.runner import journal
    from rcnn_lab.runner import tracking as tr
    from rcnn_lab.runner.hooks import MLflowHook

    url = server.url
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(journal, "RETRY_S", 0.2)
    failures, real_ship, real_after_step = [], journal.ship, MLflowHook.after_step

    def ship(c, run_id, entry):
        try:
            return real_ship(c, run_id, entry)
        except Exception as exc:
            failures.append(exc)
            raise

    def after_step(self, trainer, record):
        real_after_step(self, trainer, record)
        if record.iteration == 2:
            server.stop()
        elif record.iteration == 5:
            deadline = time.time() + 60
            while not failures and time.time() < deadline:  # the shipper met the dead server meanwhile
                time.sleep(0.05)
            server.start()

    monkeypatch.setattr(journal, "ship", ship)
    monkeypatch.setattr(MLflowHook, "after_step", after_step)
    monkeypatch.chdir(tmp_path)
    try:
        exp = tiny_experiment(tmp_path / "e", url, iterations=8, name="outage")
        code, out, err = cli("run", str(exp), "--no-progress")
        assert code == 0, err
        assert failures and all(tr.unreachable(exc) for exc in failures)
        assert "Traceback" not in out + err
        told = [line for line in out.splitlines() if line.startswith(f"tracking store {url}")]
        assert len(told) == 2 and " is not answering since " in told[0] and "(connection refused)" in told[0]
        assert " answers again " in told[1]  # one line each way, on stdout; no closing line: everything was stored
        assert "Retrying" not in err and "tracking store" not in err
        c = MlflowClient(url)
        (child,) = c.search_runs([c.get_experiment_by_name("outage").experiment_id], "tags.`rcnn_lab.kind` = 'variant'")
        assert child.info.status == "FINISHED" and "final/segm_AP" in child.data.metrics
        assert sorted(m.step for m in c.get_metric_history(child.info.run_id, "loss")) == list(range(1, 9))
        assert not list((tmp_path / "runs" / "outputs").rglob("journal.jsonl"))  # all stored: no journal left
    finally:
        if server.proc.poll() is not None:  # stopped and not started again: the module's other tests need it
            server.start()
