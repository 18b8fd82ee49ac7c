"""Gallery grid, error analysis and per-category AP read back from a store whose runs hold the artifacts
``rcnn-lab run`` writes (``gallery/<id>.png``, ``eval/detections.json.gz``, ``eval/per_class.json``).

``build_artifact_store`` is shared with ``tests/cli/test_report.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.report.test_errors import DETS, GT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
EXP = "gal"
COLOURS = {("base", 0): (200, 0, 0), ("base", 1): (0, 200, 0), ("other", 0): (0, 0, 200), ("other", 1): (90, 90, 90)}
PER_CLASS = {"base": [0.2, 0.4], "other": [0.6, 0.8]}  # AP of category "a" per seed; "b" has no GT (-1)


def build_artifact_store(root: Path, new_store) -> str:
    """The gallery's store at ``root/mlflow.db`` (``new_store``: the fixture); returns its URI."""
    from mlflow import MlflowClient

    from rcnn_lab.engine import eval_file

    uri = new_store(root, "mlflow.db")
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment(EXP, artifact_location=(root / "artifacts").as_uri())
    t0 = 1_700_000_000_000
    parent = c.create_run(exp_id, start_time=t0, tags={"rcnn_lab.kind": "sweep"}).info.run_id
    for i, ((variant, seed), colour) in enumerate(COLOURS.items()):
        tags = {"rcnn_lab.kind": "variant", "mlflow.parentRunId": parent, "rcnn_lab.variant": variant,
                "rcnn_lab.seed": str(seed), "rcnn_lab.config_hash": f"h-{variant}", "rcnn_lab.baseline": str(variant == "base").lower(),
                "rcnn_lab.changed": json.dumps({"model.rpn.nms_thresh": 0.6} if variant == "other" else {})}
        rid = c.create_run(exp_id, start_time=t0 + 1000 * (i + 1), tags=tags).info.run_id
        c.log_metric(rid, "final/bbox_AP", 0.1 * (i + 1), step=2)
        for image_id in (1, 4):
            c.log_image(rid, np.full((20, 30, 3), colour, np.uint8), artifact_file=f"gallery/{image_id}.png")
        dets = DETS if variant == "base" else DETS[:1]  # "other" drops the false positives
        data = eval_file.build(dets, [1], _coco(GT), 2, ["bbox"])
        path = eval_file.write(root / rid / eval_file.ARTIFACT, data)
        c.log_artifact(rid, str(path), "eval")
        c.log_text(rid, json.dumps({"bbox": {"a": PER_CLASS[variant][seed], "b": -1.0}}), "eval/per_class.json")
        c.set_terminated(rid, "FINISHED")
    c.set_terminated(parent, "FINISHED")
    return uri


def _coco(gt: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    return coco


@pytest.fixture(scope="module")
def df(tmp_path_factory, new_store):
    from rcnn_lab.report import runs

    return runs(EXP, tracking_uri=build_artifact_store(tmp_path_factory.mktemp("art"), new_store))


def test_gallery_grid_rows_are_variants_columns_images_one_seed(df, tmp_path):
    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import gallery_panels, plot_gallery

    seed, panels = gallery_panels(df)
    assert seed == 0 and list(panels) == [(EXP, "base"), (EXP, "other")]
    assert all(sorted(p) == [1, 4] for p in panels.values())
    assert tuple(panels[(EXP, "other")][4][0, 0]) == COLOURS[("other", 0)]
    seed, panels = gallery_panels(df, seed=1)
    assert tuple(panels[(EXP, "base")][1][5, 5]) == COLOURS[("base", 1)]
    path = plot_gallery(df, tmp_path / "g.png", seed=1)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="--seed: no finished run with seed 5 \\(seeds: 0, 1\\)"):
        gallery_panels(df, seed=5)


def test_errors_and_per_class_from_the_saved_files_average_the_seeds(df, tmp_path):
    from rcnn_lab.report import analyze, errors, per_class, plot_errors, plot_pr

    err = errors(df).set_index("variant")
    assert err["iou_type"].tolist() == ["bbox", "bbox"] and err["runs"].tolist() == [2, 2]
    base, other = analyze(GT, DETS, "bbox"), analyze(GT, DETS[:1], "bbox")
    for t, v in base["breakdown"].items():
        assert err.loc["base", t] == pytest.approx(v) and err.loc["other", t] == pytest.approx(other["breakdown"][t])
    assert err.loc["other", "BG"] == pytest.approx(err.loc["other", "Oth"])  # nothing left to forgive
    assert err.loc["base", "pr50"] == pytest.approx(base["pr"][0.5])
    assert plot_errors(err.reset_index(), "bbox", tmp_path / "e.png").exists()
    assert plot_pr(err.reset_index(), "bbox", tmp_path / "p.png").exists()
    pc = per_class(df).set_index("variant")
    assert pc.loc["base", "a"] == pytest.approx(0.3) and pc.loc["other", "a"] == pytest.approx(0.7)
    assert np.isnan(pc.loc["base", "b"])
    one = per_class(df, seed=1).set_index("variant")
    assert one.loc["other", "a"] == pytest.approx(0.8)


def test_runs_without_saved_files_say_how_to_get_them(tmp_path, new_store):
    from mlflow import MlflowClient

    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import errors, gallery_panels, runs

    uri = new_store(tmp_path, "mlflow.db")
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment("bare", artifact_location=(tmp_path / "a").as_uri())
    rid = c.create_run(exp_id, tags={"rcnn_lab.kind": "variant", "rcnn_lab.variant": "v", "rcnn_lab.seed": "0"}).info.run_id
    c.set_terminated(rid, "FINISHED")
    bare = runs("bare", tracking_uri=uri)
    with pytest.raises(ConfigError, match="no finished run saved eval/detections.json.gz.*rerun them with --force"):
        errors(bare)
    with pytest.raises(ConfigError, match="no run with seed 0 logged a gallery; set eval.gallery: N"):
        gallery_panels(bare)
