"""``rcnn-lab report`` end to end on a real sqlite MLflow store (runner tag/metric layout, 2 variants x 3 seeds)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest

from rcnn_lab.cli.main import main

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside MLflow's sqlalchemy store

EXP = "cli_grid"
KEY = "model.rpn.post_nms_top_n.train"
# variant: (post_nms_top_n.train, bbox_AP per seed, segm_AP per seed)
VALUES = {"n50": (50, [0.20, 0.24, 0.22], [0.18, 0.21, 0.19]), "n300": (300, [0.30, 0.31, 0.35], [0.27, 0.29, 0.30])}


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_store):
    """-> (uri, parent run id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    root = tmp_path_factory.mktemp("mlflow")
    uri = new_store(root, "mlflow.db")
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment(EXP, artifact_location=(root / "artifacts").as_uri())
    c.create_experiment("nothing_yet", artifact_location=(root / "artifacts2").as_uri())
    t0 = 1_700_000_000_000
    parent = c.create_run(exp_id, start_time=t0, tags={"rcnn_lab.kind": "sweep"}).info.run_id
    for i, (variant, (top_n, bbox, segm)) in enumerate(VALUES.items()):
        for seed in range(3):
            tags = {"rcnn_lab.kind": "variant", "mlflow.parentRunId": parent, "rcnn_lab.variant": variant,
                    "rcnn_lab.seed": str(seed), "rcnn_lab.config_hash": f"h{i}", "rcnn_lab.baseline": str(i == 0).lower(),
                    "rcnn_lab.changed": json.dumps({KEY: top_n} if i else {}), "rcnn_lab.device": "cpu"}
            start = t0 + 1000 * (1 + 3 * i + seed)
            rid = c.create_run(exp_id, start_time=start, tags=tags).info.run_id
            final = {"bbox_AP": bbox[seed], "segm_AP": segm[seed], "train_time_s": 60.0, "eval_images_per_s": 20.0}
            metrics = [Metric(f"final/{k}", v, start, 100) for k, v in final.items()]
            metrics += [Metric("loss", 3.0 / step, start + step, step) for step in range(1, 6)]
            params = [Param(KEY, json.dumps(top_n)), Param("train.iterations", "100"), Param("data.batch_size", "2")]
            c.log_batch(rid, metrics=metrics, params=params)
            c.set_terminated(rid, "FINISHED")
    c.set_terminated(parent, "FINISHED")
    return uri, parent


def test_markdown_is_the_default(store, capsys):
    uri, _ = store
    assert main(["report", EXP, "--uri", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| variant") and "bbox_AP" in lines[0] and "segm_AP" in lines[0]
    assert lines[2].startswith("| n50 (baseline)") and lines[3].startswith("| n300")
    assert f"{np.mean(VALUES['n300'][1]):.3f} ± {np.std(VALUES['n300'][1], ddof=1):.3f}" in lines[3]


def test_csv_and_json_hold_the_statistics(store, capsys):
    from scipy import stats

    uri, _ = store
    assert main(["report", EXP, "--uri", uri, "--format", "csv", "--metric", "bbox_AP"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("variant")
    base, other = VALUES["n50"][1], VALUES["n300"][1]
    assert table.loc["n300", "bbox_AP_mean"] == pytest.approx(np.mean(other))
    assert table.loc["n300", "bbox_AP_p"] == pytest.approx(stats.ttest_rel(other, base).pvalue)
    assert table.loc["n300", KEY] == 300 and "segm_AP_mean" not in table.columns

    assert main(["report", EXP, "--uri", uri, "--format", "json", "--metric", "segm_AP", "--metric", "bbox_AP,segm_AP"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in records] == ["n50", "n300"]
    assert [k for k in records[0] if k.endswith("_ci_low")] == ["segm_AP_ci_low", "bbox_AP_ci_low"]
    assert records[1]["segm_AP_delta"] == pytest.approx(np.mean(VALUES["n300"][2]) - np.mean(VALUES["n50"][2]))
    assert records[0]["images_per_s_mean"] == pytest.approx(100 * 2 / 60.0)


def test_out_folder_writes_table_and_plots_and_attaches_them(store, tmp_path, capsys):
    from mlflow import MlflowClient

    uri, parent = store
    out = tmp_path / "reports"
    out.mkdir()
    assert main(["report", EXP, "--uri", uri, "--out", str(out), "--format", "html"]) == 0
    captured = capsys.readouterr()
    assert "<table" in captured.out and "wrote" in captured.err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "report.html", "report_bbox_AP.png", "report_segm_AP.png", "report_losses.png",
        f"report_bbox_AP_vs_{KEY.replace('.', '_')}.png", f"report_segm_AP_vs_{KEY.replace('.', '_')}.png",
    ])
    assert all((out / n).read_bytes()[:4] == b"\x89PNG" for n in names if n.endswith(".png"))
    attached = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent, "report")}
    assert attached == {f"report/{n}" for n in names}


def test_out_file_infers_format_and_group_by(store, tmp_path, capsys):
    uri, _ = store
    target = tmp_path / "sub" / "topn.csv"
    assert main(["report", EXP, "--uri", uri, "--out", str(target), "--group-by", KEY, "--no-log"]) == 0
    assert "attached" not in capsys.readouterr().err
    table = pd.read_csv(target)
    assert table[KEY].tolist() == [50, 300] and table["baseline"].tolist() == [True, False]
    assert (tmp_path / "sub" / "topn_segm_AP.png").exists() and (tmp_path / "sub" / "topn_losses.png").exists()
    assert (tmp_path / "sub" / f"topn_bbox_AP_vs_{KEY.replace('.', '_')}.png").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["cli_gird"], "no MLflow experiment 'cli_gird'"),
    (["nothing_yet"], "experiment 'nothing_yet' has no rcnn-lab runs"),
    ([EXP, "--metric", "segm_ap"], "--metric: unknown metric 'segm_ap'; did you mean 'segm_AP'?"),
    ([EXP, "--group-by", "model.rpn.post_nms"], f"did you mean '{KEY}'"),
    ([EXP, "--baseline", "n30"], "--baseline: no variant 'n30'"),
])
def test_user_errors_exit_2_with_one_line(store, capsys, args, message):
    uri, _ = store
    assert main(["report", *args, "--uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rcnn-lab report: error:") and message in err[0]


def test_missing_store_is_not_created(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'nope.db'}"
    assert main(["report", EXP, "--uri", uri]) == 2
    assert "no tracking store" in capsys.readouterr().err and not (tmp_path / "nope.db").exists()


def test_per_class_errors_gallery_mde_and_the_html_page(tmp_path, capsys, new_store):
    from mlflow import MlflowClient

    from tests.report.test_gallery import EXP as GAL
    from tests.report.test_gallery import build_artifact_store

    uri = build_artifact_store(tmp_path / "store", new_store)
    capsys.readouterr()  # pycocotools' "creating index..." while the store is built
    out = tmp_path / "rep"
    assert main(["report", GAL, "--uri", uri, "--metric", "bbox_AP", "--per-class", "--errors", "--gallery", "--seed", "1",
                 "--mde", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "seeds for 2 pt bbox_AP" in text.splitlines()[0]
    assert "Per-category AP" in text and "| variant | iou_type |" in text and "COCO error breakdown" in text
    for col in ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"):
        assert f" {col} " in text.split("COCO error breakdown")[1]
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "report_gallery.png", "report_errors_bbox.png", "report_pr_bbox.png"} <= names
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len([n for n in names if n.endswith(".png")])
    assert "COCO error breakdown" in page and "<table" in page
    parent = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name(GAL).experiment_id], "tags.`rcnn_lab.kind` = 'sweep'")[0]
    attached = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report_gallery.png", "report/report_errors_bbox.png"} <= attached


@pytest.mark.parametrize(("args", "message"), [
    (["--errors"], "--errors: no finished run saved eval/detections.json.gz"),
    (["--gallery", "--out", "OUT"], "--gallery: no run with seed 0 logged a gallery"),
    (["--gallery", "--seed", "9", "--out", "OUT"], "--seed: no finished run with seed 9"),
    (["--mde", "-1"], "--mde: must be a positive number of AP points"),
    (["--out", "OUT", "--cost", "flop"], "--cost: unknown cost 'flop'"),
])
def test_analysis_flags_on_runs_without_their_files_exit_2(store, tmp_path, capsys, args, message):
    uri, _ = store
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    assert main(["report", EXP, "--uri", uri, "--no-log", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()  # nothing half-written
