"""``rcnn-lab eval`` bad input (no evaluation runs): one line naming the flag and the fix, exit 2, no MLflow run,
no file written. The evaluation itself: tests/runner/test_evaluate_only.py."""

from __future__ import annotations

import os

import pytest

from tests.runner.conftest import cli, files_under, tiny_experiment

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_store) -> dict:
    """A store with experiment ``tiny`` holding a FINISHED variant run whose outputs are gone, a RUNNING one and an
    evaluation of the first."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    folder = tmp_path_factory.mktemp("store")
    uri = new_store(folder, "mlflow.db")
    c = MlflowClient(uri)
    exp_id = c.create_experiment("tiny", artifact_location=(folder / "artifacts").as_uri())
    ids = {}
    for name, status in (("finished", "FINISHED"), ("running", "RUNNING"), ("evaluation", "FINISHED")):
        tags = {"rcnn_lab.kind": "eval" if name == "evaluation" else "variant", "rcnn_lab.variant": "b",
                "rcnn_lab.seed": "0", "rcnn_lab.config_hash": f"{name:0<16}"}
        if name == "evaluation":
            tags["rcnn_lab.evaluated_run"] = ids["finished"]
        ids[name] = c.create_run(exp_id, tags=tags).info.run_id
        c.log_batch(ids[name], params=[Param("name", "tiny")])
        if status != "RUNNING":
            c.set_terminated(ids[name], status)
    return {"uri": uri, "folder": folder, "client": c, "exp_id": exp_id, **ids}


@pytest.fixture
def exp(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RCNN_LAB_RUNS", raising=False)
    return tiny_experiment(tmp_path / "exp", store["uri"])


def refused(store, tmp_path, *argv: str) -> str:
    """Run ``rcnn-lab eval ARGV``: exit 2 with one error line, and nothing written (store, outputs, cwd). -> the line."""
    c = store["client"]
    runs_before = len(c.search_runs([store["exp_id"]]))
    files_before = files_under(tmp_path) | files_under(store["folder"])
    code, out, err = cli("eval", *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rcnn-lab eval: error: "), err
    assert len(c.search_runs([store["exp_id"]])) == runs_before  # no MLflow run
    assert files_under(tmp_path) | files_under(store["folder"]) == files_before  # no file, no outputs folder
    return lines[0]


def test_weights_and_run_both_or_neither(exp, store, tmp_path):
    line = refused(store, tmp_path, str(exp), "--weights", "w.pth", "--run", store["finished"])
    assert "--weights: and --run both given" in line
    line = refused(store, tmp_path, str(exp))
    assert "--weights: missing" in line and "--run RUN_ID" in line


def test_missing_weights_file(exp, store, tmp_path):
    line = refused(store, tmp_path, str(exp), "--weights", "missing.pth")
    assert "--weights: weights file 'missing.pth' not found" in line


def test_unknown_variant(exp, store, tmp_path):
    line = refused(store, tmp_path, str(exp), "--run", store["finished"], "--variant", "bb")
    assert "--variant: no variant 'bb'; did you mean 'b'?" in line


def test_run_id_not_in_the_store(exp, store, tmp_path):
    line = refused(store, tmp_path, str(exp), "--run", "0123456789abcdef0123456789abcdef")
    assert "--run: no run '0123456789abcdef0123456789abcdef' in the tracking store" in line


def test_run_without_checkpoint_or_not_finished(exp, store, tmp_path):
    line = refused(store, tmp_path, str(exp), "--run", store["finished"])
    assert f"--run: run {store['finished']} has no checkpoint" in line and "give a checkpoint file" in line
    line = refused(store, tmp_path, str(exp), "--weights", f"run:{store['running']}")  # --weights run:ID is --run ID
    assert f"--run: run {store['running']} is RUNNING, not finished" in line
    line = refused(store, tmp_path, str(exp), "--run", store["evaluation"])
    assert f"--run: run {store['evaluation']} is an evaluation (rcnn-lab eval)" in line
    assert f"give the run it evaluated, {store['finished']}" in line


def test_run_without_a_store_creates_none(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "nowhere" / "mlflow.db"
    exp = tiny_experiment(tmp_path / "exp", f"sqlite:///{db}")
    line = refused(store, tmp_path, str(exp), "--run", store["finished"])
    assert "--run: no tracking store at" in line
    assert not db.parent.exists()


def test_weights_of_another_architecture(exp, store, tmp_path):
    import torch

    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.models.builder import build_model

    three = tmp_path / "three_classes.pth"
    torch.save(build_model(load_experiment(exp, ["model.num_classes=3"]).variants[0].config.model).state_dict(), three)
    # the predictors (6 classes here, 3 in the file) would keep random weights: not an evaluation
    line = refused(store, tmp_path, str(exp), "--weights", str(three))
    assert "--weights: " in line and "does not fit variant b's model" in line
    assert "roi_heads.box_predictor.cls_score.weight (3 -> 6 classes)" in line
    # an R18 file into an R50 model: hardly anything fits
    line = refused(store, tmp_path, str(exp), "--weights", str(three), "--set", "model.backbone.depth=50")
    assert "--weights: variant b: " in line and "does not fit this model" in line
    # an R34 file into the R18 model: every R18 tensor fits by name and shape, the extra blocks are another
    # architecture all the same (the rule predict applies too: engine.weights.whole)
    deeper = tmp_path / "r34.pth"
    torch.save(build_model(load_experiment(exp, ["model.backbone.depth=34"]).variants[0].config.model).state_dict(), deeper)
    line = refused(store, tmp_path, str(exp), "--weights", str(deeper))
    assert "does not fit variant b's model" in line and "not in the model" in line and "layer" in line


@pytest.mark.parametrize("argv, words", [
    (["eval", "good.yaml"], "--weights: missing"),
    (["eval", "good.yaml", "--weights", "w.pth", "--run", "abc"], "--weights: and --run both given"),
    (["eval", "bad.yaml", "--run", "abc"], "bad.yaml: invalid YAML at line"),
])
def test_flag_and_yaml_errors_answer_without_importing_torch(tmp_path, argv, words):
    from tests.cli.test_main import _fresh

    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    (tmp_path / "good.yaml").write_text("name: good\n")
    result, err = _fresh(*argv, cwd=tmp_path)
    assert result == ["2", "False", "False"], err
    assert words in err
