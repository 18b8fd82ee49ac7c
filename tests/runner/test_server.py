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


@pytest.fixture(scope="module")
def server(tmp_path_factory, new_store):
    """-> (url, server folder). The server always stops at the end."""
    root = tmp_path_factory.mktemp("server")
    backend = new_store(root)
    url = f"http://127.0.0.1:{_free_port()}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1",
         "--backend-store-uri", backend, "--artifacts-destination", (root / "served").as_uri()],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not _answers(url):
            if proc.poll() is not None:
                tail = (root / "server.log").read_text().strip().splitlines()[-1:]
                pytest.skip(f"mlflow server cannot start here: {tail}")
            if time.time() > deadline:
                pytest.fail(f"mlflow server did not answer within 240 s: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_run_logs_runs_metrics_and_artifacts_to_a_server(server, tmp_path):
    from mlflow import MlflowClient

    url, root = server
    exp = tiny_experiment(tmp_path / "e", url)
    code, out, err = cli("run", str(exp), "--no-progress")
    assert code == 0, err
    assert "View run" not in out  # MLflow's per-run URL lines are silenced
    c = MlflowClient(url)
    exp_id = c.get_experiment_by_name("tiny").experiment_id
    (child,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")
    parent = c.get_run(child.data.tags["mlflow.parentRunId"])
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
