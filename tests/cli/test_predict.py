"""``rcnn-lab predict``: pictures and results for image files and folders; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import EXPERIMENTS, TINY_MODEL
from tests.runner.conftest import cli, tiny_experiment

EXPERIMENT = f"""base: {EXPERIMENTS / 'base.yaml'}
name: tiny_predict
seeds: [0]
{TINY_MODEL}
data:
  train: {{type: shapes, split: train, num_images: 4, image_size: 64}}
  val: {{type: shapes, split: val, num_images: 2, image_size: 64}}
train: {{device: cpu}}
eval: {{batch_size: 2}}
"""


def files_under(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """An experiment, a weights file for its model (seeded, every box kept), three images in a folder."""
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.models.builder import build_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RCNN_LAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    torch.manual_seed(0)
    model = build_model(load_experiment(tmp_path / "exp.yaml").variants[0].config.model)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    photos = tmp_path / "photos"
    (photos / "day2").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(photos / "day2" / "gray.png")
    Image.fromarray(rng.integers(0, 65535, (30, 50)).astype(np.uint16)).save(photos / "day2" / "deep.png")
    return tmp_path


def test_predict_writes_pictures_and_one_results_file(setup):
    code, out, err = cli("predict", "exp.yaml", "photos", "--weights", "w.pth", "--out", "preds", "--score", "0",
                         "--set", "model.roi_heads.score_thresh=0.0")
    assert code == 0, err
    lines = [line for line in out.splitlines() if not line.startswith("plugins: ")]
    assert lines[0].startswith("w.pth: loaded ")
    per_image = [line for line in lines if line.startswith("photos/")]
    assert [line.split(":")[0] for line in per_image] == ["photos/a.jpg", "photos/day2/deep.png", "photos/day2/gray.png"]
    assert all(" detection" in line for line in per_image)
    assert "3 image(s)" in lines[-1] and "preds/results.json" in lines[-1]
    assert files_under(setup / "preds") == {"images", "images/a.png", "images/day2", "images/day2/deep.png",
                                             "images/day2/gray.png", "results.json"}
    results = json.loads((setup / "preds" / "results.json").read_text())
    counts = [int(line.split(": ")[1].split(" ")[0]) for line in per_image]
    assert len(results) == sum(counts) > 0
    assert {r["image_id"] for r in results} <= {1, 2, 3}
    assert {r["file_name"] for r in results} <= {"photos/a.jpg", "photos/day2/deep.png", "photos/day2/gray.png"}
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.registry import DATASETS

    val = DATASETS.build(load_experiment(setup / "exp.yaml").variants[0].config.data.val, "data.val")
    assert {r["category_id"] for r in results} <= {c["id"] for c in val.categories}
    assert Image.open(setup / "preds" / "images" / "a.png").size == (64, 48)
    assert not (setup / "runs").exists() and not (setup / "mlruns").exists()  # no MLflow run, no store


def test_an_unreadable_image_is_one_line_and_the_others_go_on(setup):
    (setup / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = cli("predict", "exp.yaml", "photos", "--weights", "w.pth", "--out", "preds")
    assert code == 2
    assert err.splitlines()[0].startswith("skipped: photos/broken.png: ")
    assert err.splitlines()[-1].startswith("rcnn-lab predict: error: 1 of 4 image(s) could not be read")
    assert len(err.splitlines()) == 2
    assert "3 image(s)" in out.splitlines()[-1]
    assert (setup / "preds" / "images" / "a.png").is_file() and not (setup / "preds" / "images" / "broken.png").exists()


def other_weights(setup, *overrides: str):
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.models.builder import build_model

    model = build_model(load_experiment(setup / "exp.yaml", list(overrides)).variants[0].config.model)
    torch.save(model.state_dict(), setup / "other.pth")
    return "other.pth"


@pytest.mark.parametrize("case,argv,expected", [
    ("missing weights", ["photos", "--weights", "nope.pth"], ["--weights", "nope.pth", "not found"]),
    ("other architecture", ["photos", "--weights", "@depth34"], ["--weights", "does not fit", "not in the model"]),
    ("other classes", ["photos", "--weights", "@classes"], ["--weights", "does not fit", "kept fresh"]),
    ("not a weights file", ["photos", "--weights", "photos/a.jpg"], ["--weights", "not a readable weights file"]),
    ("both weights and run", ["photos", "--weights", "w.pth", "--run", "abc"], ["--weights", "--run"]),
    ("no weights", ["photos"], ["--weights", "missing"]),
    ("run without a store", ["photos", "--run", "0123abcd"], ["--run", "no tracking store"]),
    ("empty folder", ["empty", "--weights", "w.pth"], ["IMAGES", "holds no image file"]),
    ("no image file", ["notes.txt", "--weights", "w.pth"], ["IMAGES", "not an image file"]),
    ("missing image", ["photos/nope.jpg", "--weights", "w.pth"], ["IMAGES", "does not exist"]),
    ("out is a file", ["photos", "--weights", "w.pth", "--out", "notes.txt"], ["--out", "is a file"]),
    ("score above 1", ["photos", "--weights", "w.pth", "--score", "1.5"], ["--score", "[0, 1]"]),
    ("score nan", ["photos", "--weights", "w.pth", "--score", "nan"], ["--score"]),
    ("unknown variant", ["photos", "--weights", "w.pth", "--variant", "nope"], ["--variant", "no variant"]),
    ("device without cuda", ["photos", "--weights", "w.pth", "--device", "cuda:0"], ["--device", "CUDA"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, case, argv, expected):
    (setup / "empty").mkdir()
    (setup / "notes.txt").write_text("not an image")
    if "@depth34" in argv:
        argv = [other_weights(setup, "model.backbone.depth=34") if a == "@depth34" else a for a in argv]
    if "@classes" in argv:
        argv = [other_weights(setup, "model.num_classes=3") if a == "@classes" else a for a in argv]
    if case == "device without cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    if "--out" not in argv:
        argv = [*argv, "--out", "preds"]
    before = files_under(setup)
    code, out, err = cli("predict", "exp.yaml", *argv)
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rcnn-lab predict: error: ") and "Traceback" not in err
    for word in expected:
        assert word in lines[0]
    assert files_under(setup) == before  # no --out folder, no store, nothing else


def test_several_variants_need_variant(setup):
    (setup / "two.yaml").write_text(EXPERIMENT + "variants:\n  a: {}\n  b: {model.roi_heads.detections_per_img: 5}\n")
    code, _, err = cli("predict", "two.yaml", "photos", "--weights", "w.pth", "--out", "preds")
    assert code == 2 and "--variant: missing: tiny_predict has 2 variants (a, b)" in err
    assert not (setup / "preds").exists()
    code, out, err = cli("predict", "two.yaml", "photos", "--weights", "w.pth", "--out", "preds", "--variant", "b",
                         "--no-draw")
    assert code == 0, err
    assert files_under(setup / "preds") == {"images", "results.json"}


def test_predict_with_a_finished_run(tmp_path, monkeypatch, new_store):
    """--run RUN_ID: the run's last checkpoint, found through the store; predict itself records no run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RCNN_LAB_RUNS", str(tmp_path / "runs"))
    new_store(tmp_path, "runs/mlflow.db")  # the default store under RCNN_LAB_RUNS, copied empty
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    exp = tiny_experiment(tmp_path, None, iterations=1, train="  checkpoint_every: 1\n")
    code, _, err = cli("run", str(exp))
    assert code == 0, err
    from mlflow import MlflowClient

    from rcnn_lab.runner import tags
    from rcnn_lab.runner import tracking as tr

    client = MlflowClient(tr.resolve_uri(None))
    runs_before = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = next(r.info.run_id for r in runs_before if r.data.tags.get(tags.KIND) == tags.VARIANT_RUN)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "x.png")
    code, out, err = cli("predict", str(exp), "x.png", "--run", run_id, "--out", "preds")
    assert code == 0, err
    assert f"run {run_id} (iter_0000001.pt): loaded " in out
    assert (tmp_path / "preds" / "images" / "x.png").is_file()
    code, out, err = cli("predict", str(exp), "x.png", "--run", "0123456789abcdef", "--out", "preds2")
    assert code == 2 and len(err.splitlines()) == 1 and "--run" in err and "no run '0123456789abcdef'" in err
    assert not (tmp_path / "preds2").exists()
    runs_after = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs_after) == len(runs_before)
