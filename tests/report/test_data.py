"""``rcnn_lab.report.runs`` on a real sqlite MLflow store laid out the way ``rcnn_lab.runner.sweep`` logs runs.

``build_store`` is shared with ``test_stats.py`` (same folder, imported as ``test_data``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rcnn_lab.runner import tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside MLflow's sqlalchemy store

EXP, EXP2 = "abl", "abl2"
KEY, BOX = "model.rpn.pre_nms_top_n.train", "model.roi_heads.box_head.type"
SEEDS = [0, 1, 2]
# variant: (changed, pre_nms_top_n.train, box head, bbox_AP per seed, segm_AP per seed, train_time_s per seed)
VARIANTS = {
    "base": ({}, 600, "two_mlp", [0.30, 0.32, 0.31], [0.28, 0.30, 0.29], [100.0, 110.0, 90.0]),
    "low": ({KEY: 150}, 150, "two_mlp", [0.25, 0.28, 0.26], [0.22, 0.25, 0.21], [80.0, 85.0, 75.0]),
    "conv": ({BOX: "conv4"}, 600, "conv4", [0.33, 0.36, 0.32], [0.30, 0.31, 0.33], [120.0, 125.0, 130.0]),
}
# second experiment: a baseline with two seeds and a variant with a single seed
VARIANTS2 = {"base2": ({}, [0.50, 0.52], [0.40, 0.42]), "other2": ({KEY: 150}, [0.55], [0.45])}
ITERATIONS, BATCH = 100, 4
GRAD_NORM = "grad_norm/loss_box_reg/rpn.head.bbox_pred"  # a per-step metric with slashes and dots in its name
T0 = 1_700_000_000_000  # ms


def _tags(variant: str, seed: int, baseline: bool, changed: dict, parent: str) -> dict[str, str]:
    return {
        tags.KIND: tags.VARIANT_RUN, tags.PARENT: parent, tags.VARIANT: variant,
        tags.SEED: str(seed), tags.CONFIG_HASH: f"h-{variant}", tags.BASELINE: str(baseline).lower(),
        tags.CHANGED: json.dumps(changed), tags.DEVICE: "cpu",
    }


def _log(client, exp_id: str, parent: str, start: int, variant: str, seed: int, *, baseline: bool = False,
         changed: dict | None = None, top_n: int = 600, box: str = "two_mlp", final: dict | None = None,
         status: str | None = "FINISHED", name: str = EXP) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, start_time=start, tags=_tags(variant, seed, baseline, changed or {}, parent))
    rid = run.info.run_id
    params = {"name": name, KEY: json.dumps(top_n), BOX: box, "train.iterations": json.dumps(ITERATIONS),
              "data.batch_size": json.dumps(BATCH), "train.seed": json.dumps(seed), "eval.iou_types": '["bbox", "segm"]'}
    metrics = [Metric(f"{tags.FINAL_PREFIX}{k}", v, start, ITERATIONS) for k, v in (final or {}).items()]
    metrics += [Metric("loss", 2.0 - 0.1 * step + 0.01 * seed, start + step, step) for step in range(1, 11)]
    metrics += [Metric(GRAD_NORM, 0.5 + 0.1 * seed + 0.01 * step, start + step, step) for step in (5, 10)]
    metrics += [Metric("bbox_AP", (final or {}).get("bbox_AP", 0.0), start, ITERATIONS)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    if status:
        client.set_terminated(rid, status, end_time=start + 1000)
    return rid


def build_store(root: Path, new_store) -> str:
    """A sqlite store with two experiments at ``root/mlflow.db`` (``new_store``: the fixture); returns its URI.
    See VARIANTS / VARIANTS2 for the logged values."""
    from mlflow import MlflowClient

    uri = new_store(root, "mlflow.db")
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment(EXP, artifact_location=(root / "artifacts" / EXP).as_uri())
    parent = c.create_run(exp_id, start_time=T0, tags={tags.KIND: tags.SWEEP}).info.run_id
    # an older finished run of base/seed 0/same hash: must be ignored in favour of the newer one
    _log(c, exp_id, parent, T0 + 1, "base", 0, baseline=True,
         final={"bbox_AP": 0.10, "segm_AP": 0.05, "train_time_s": 999.0, "eval_images_per_s": 1.0})
    start = T0 + 10_000
    for vi, (variant, (changed, top_n, box, bbox, segm, times)) in enumerate(VARIANTS.items()):
        for i, seed in enumerate(SEEDS):
            final = {"bbox_AP": bbox[i], "segm_AP": segm[i], "bbox_AP50": bbox[i] + 0.2, "train_time_s": times[i],
                     "eval_images_per_s": 10.0 * (vi + 1) + seed}
            _log(c, exp_id, parent, start, variant, seed, baseline=variant == "base", changed=changed, top_n=top_n,
                 box=box, final=final)
            start += 10_000
    # unfinished runs with absurd values: counted, never averaged
    _log(c, exp_id, parent, start, "low", 3, changed=VARIANTS["low"][0], top_n=150, status="FAILED",
         final={"bbox_AP": 0.99, "segm_AP": 0.99})
    _log(c, exp_id, parent, start + 1, "conv", 3, changed=VARIANTS["conv"][0], box="conv4", status=None,
         final={"bbox_AP": 0.0, "segm_AP": 0.0})
    _log(c, exp_id, parent, start + 2, "base", 4, baseline=True, status="KILLED")
    c.set_terminated(parent, "FAILED")

    exp2 = c.create_experiment(EXP2, artifact_location=(root / "artifacts" / EXP2).as_uri())
    parent2 = c.create_run(exp2, start_time=T0, tags={tags.KIND: tags.SWEEP}).info.run_id
    for variant, (changed, bbox, segm) in VARIANTS2.items():
        for seed, (b, s) in enumerate(zip(bbox, segm)):
            start += 10_000
            _log(c, exp2, parent2, start, variant, seed, baseline=variant == "base2", changed=changed,
                 top_n=changed.get(KEY, 600), final={"bbox_AP": b, "segm_AP": s, "train_time_s": 50.0}, name=EXP2)
    c.set_terminated(parent2, "FINISHED")
    c.create_experiment("empty", artifact_location=(root / "artifacts" / "empty").as_uri())
    return uri


def test_runs_one_row_per_child_with_tags_metrics_and_params(uri):
    from rcnn_lab.report import runs

    df = runs(EXP, tracking_uri=uri)
    assert len(df) == 1 + 9 + 3  # old duplicate, 3 variants x 3 seeds, failed / running / killed
    assert df.columns[:4].tolist() == ["experiment", "run_id", "parent_run_id", "variant"]
    assert set(df["experiment"]) == {EXP} and df["parent_run_id"].nunique() == 1
    assert sorted(df["status"].value_counts().items()) == [("FAILED", 1), ("FINISHED", 10), ("KILLED", 1), ("RUNNING", 1)]
    low = df[(df["variant"] == "low") & (df["seed"] == 1)].iloc[0]
    assert low["bbox_AP"] == pytest.approx(0.28) and low["bbox_AP50"] == pytest.approx(0.48)
    assert low["changed"] == {KEY: 150} and low["config_hash"] == "h-low" and not low["baseline"]
    assert low[KEY] == 150 and low[BOX] == "two_mlp" and low["eval.iou_types"] == ["bbox", "segm"]
    assert "loss" not in df.columns and "final/bbox_AP" not in df.columns  # only final/* metrics, unprefixed
    assert df["seed"].dtype.name == "Int64" and df["baseline"].dtype == bool
    assert df["start_time"].is_monotonic_decreasing
    assert df.attrs["tracking_uris"] == {EXP: uri}


def test_runs_finished_only_and_several_experiments(uri):
    from rcnn_lab.report import runs

    df = runs([EXP, EXP2], tracking_uri=uri, include_unfinished=False)
    assert set(df["status"]) == {"FINISHED"}
    assert df.groupby("experiment").size().to_dict() == {EXP: 10, EXP2: 3}


def test_latest_finished_drops_older_duplicate_and_unfinished(uri):
    from rcnn_lab.report import latest_finished, metric_columns, runs

    df = runs(EXP, tracking_uri=uri)
    done = latest_finished(df)
    assert len(done) == 9
    base0 = done[(done["variant"] == "base") & (done["seed"] == 0)]
    assert base0["bbox_AP"].tolist() == [pytest.approx(0.30)]
    assert set(metric_columns(df)) == {"bbox_AP", "bbox_AP50", "segm_AP", "train_time_s", "eval_images_per_s"}


def test_latest_finished_keeps_only_the_newest_config_of_a_variant_seed(tmp_path, new_store):
    from mlflow import MlflowClient

    from rcnn_lab.report import latest_finished, runs

    store = new_store(tmp_path, "mlflow.db")
    c = MlflowClient(tracking_uri=store)
    exp_id = c.create_experiment(EXP, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp_id, start_time=T0, tags={tags.KIND: tags.SWEEP}).info.run_id
    old = _log(c, exp_id, parent, T0 + 1, "base", 0, baseline=True, final={"bbox_AP": 0.1})
    c.set_tag(old, tags.CONFIG_HASH, "h-before-the-yaml-was-edited")
    _log(c, exp_id, parent, T0 + 2, "base", 0, baseline=True, final={"bbox_AP": 0.3})
    _log(c, exp_id, parent, T0 + 3, "base", 1, baseline=True, final={"bbox_AP": 0.5})
    df = runs(EXP, tracking_uri=store)
    assert len(df) == 3 and df["config_hash"].nunique() == 2
    done = latest_finished(df)
    assert sorted(zip(done["seed"], done["bbox_AP"])) == [(0, pytest.approx(0.3)), (1, pytest.approx(0.5))]


def test_experiment_yaml_gives_name_and_store(uri, write_yaml):
    from rcnn_lab.report import runs

    path = write_yaml("abl.yaml", f"name: whatever\ntracking: {{uri: '{uri}', experiment: {EXP2}}}\n")
    df = runs(str(path))
    assert set(df["experiment"]) == {EXP2} and len(df) == 3


def test_unknown_experiment_and_missing_store_are_config_errors(uri, tmp_path):
    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import runs

    with pytest.raises(ConfigError, match="no MLflow experiment 'ab1'.*did you mean 'abl'"):
        runs("ab1", tracking_uri=uri)
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(ConfigError, match="no tracking store"):
        runs(EXP, tracking_uri=missing)
    assert not (tmp_path / "none.db").exists()  # reports never create a store
    assert runs("empty", tracking_uri=uri).empty
