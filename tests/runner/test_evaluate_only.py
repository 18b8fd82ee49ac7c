"""``rcnn-lab eval`` end to end on a sqlite store in tmp: a trained run's last checkpoint evaluated again gives that
run's final evaluation exactly; the eval run's record (kind, weights identity, artifacts); skip / --force; report rows."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import pytest

from tests.runner.conftest import cli, in_folder, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

COCO_KEYS = ("bbox_", "segm_")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, new_store):
    """Train ``b`` (2 iterations, gallery of 2), evaluate its run twice (the second is skipped), once with --force,
    and once with the weights of a differently seeded model (a file)."""
    import torch
    from mlflow import MlflowClient

    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.models.builder import build_model

    root = tmp_path_factory.mktemp("eval")
    with in_folder(root):
        uri = new_store(root)
        exp_file = tiny_experiment(root, uri, variants="  b: {eval.gallery: 2}\n")
        s = SimpleNamespace(root=root, exp_file=exp_file, client=MlflowClient(uri))
        s.train = cli("run", str(exp_file), "--no-progress")
        s.exp_id = s.client.get_experiment_by_name("tiny").experiment_id
        (s.trained,) = s.client.search_runs([s.exp_id], "tags.`rcnn_lab.kind` = 'variant'")
        rid = s.trained.info.run_id
        s.first = cli("eval", str(exp_file), "--run", rid, "--no-progress")
        s.again = cli("eval", str(exp_file), "--run", rid, "--no-progress")
        s.forced = cli("eval", str(exp_file), "--run", rid, "--force", "--no-progress")
        torch.manual_seed(123)
        other = root / "other seed.pth"
        torch.save(build_model(load_experiment(exp_file).variants[0].config.model).state_dict(), other)
        s.other = cli("eval", str(exp_file), "--weights", str(other), "--no-progress")
    s.evals = s.client.search_runs([s.exp_id], "tags.`rcnn_lab.kind` = 'eval'", order_by=["attributes.start_time ASC"])
    return s


def detections(s, run_id: str, tmp_path) -> list[dict]:
    path = s.client.download_artifacts(run_id, "eval/detections.json.gz", str(tmp_path / run_id))
    with gzip.open(path, "rt") as f:
        return json.load(f)["results"]


def test_evaluating_a_finished_runs_last_checkpoint_reproduces_its_final_evaluation(evaluated, tmp_path):
    for code, _, err in (evaluated.train, evaluated.first):
        assert code == 0, err
    trained, ev = evaluated.trained, evaluated.evals[0]
    want = {k: v for k, v in trained.data.metrics.items() if k.startswith("final/")
            and (k[len("final/"):].startswith(COCO_KEYS) or k in ("final/params", "final/gflops"))}
    assert len(want) >= 16  # bbox/segm AP and AR (those COCO defines on this data), params, gflops
    got = {k: v for k, v in ev.data.metrics.items() if k in want or k[len("final/"):].startswith(COCO_KEYS)}
    assert got == want  # exactly, and the same names: the same evaluation on the same weights
    mine, theirs = detections(evaluated, ev.info.run_id, tmp_path), detections(evaluated, trained.info.run_id, tmp_path)
    assert len(theirs) > 0 and mine == theirs  # every box, score and mask of every image


def test_other_weights_give_other_detections(evaluated, tmp_path):
    code, out, err = evaluated.other
    assert code == 0, err
    other = evaluated.evals[-1]
    assert other.data.tags["rcnn_lab.weights_identity"].startswith("sha256:")
    assert other.data.tags["rcnn_lab.weights_source"] == "other seed.pth"
    assert "rcnn_lab.evaluated_run" not in other.data.tags
    assert detections(evaluated, other.info.run_id, tmp_path) != detections(evaluated, evaluated.evals[0].info.run_id, tmp_path)


def test_eval_run_records_kind_weights_config_and_artifacts(evaluated, tmp_path):
    c, trained, ev = evaluated.client, evaluated.trained, evaluated.evals[0]
    rid, t = trained.info.run_id, ev.data.tags
    assert ev.info.status == "FINISHED" and t["rcnn_lab.kind"] == "eval" and "mlflow.parentRunId" not in t
    assert t["rcnn_lab.evaluated_run"] == rid and t["rcnn_lab.weights_identity"] == f"run:{rid}"
    assert t["rcnn_lab.weights_source"] == f"run {rid[:8]}"
    assert t["rcnn_lab.weights"].startswith("loaded ") and "kept fresh" not in t["rcnn_lab.weights"]
    assert (t["rcnn_lab.variant"], t["rcnn_lab.seed"]) == ("b", "0")
    assert t["rcnn_lab.config_hash"] != trained.data.tags["rcnn_lab.config_hash"]  # the eval hash: config + weights
    assert ev.data.params == trained.data.params  # the resolved config the checkpoint was trained with
    assert [m.step for m in c.get_metric_history(ev.info.run_id, "final/segm_AP")] == [2]  # the checkpoint's iteration
    assert [m.step for m in c.get_metric_history(ev.info.run_id, "bbox_AP")] == [2]
    top = {a.path for a in c.list_artifacts(ev.info.run_id)}
    assert {"config.yaml", "model_summary.txt", "weights.txt", "eval", "gallery"} <= top and "loss_curve.png" not in top
    assert {a.path for a in c.list_artifacts(ev.info.run_id, "eval")} == {
        "eval/detections.json.gz", "eval/metrics.json", "eval/per_class.json"}
    assert {a.path for a in c.list_artifacts(ev.info.run_id, "gallery")} == {"gallery/1.png", "gallery/4.png"}
    report = (tmp_path / "w" / "weights.txt")
    c.download_artifacts(ev.info.run_id, "weights.txt", str(report.parent))
    assert f"identity: run:{rid}" in report.read_text()
    (inp,) = c.get_run(ev.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "shapes/val" and inp.tags[0].value == "validation"


def test_the_same_config_and_weights_are_evaluated_once_unless_forced(evaluated):
    code, out, err = evaluated.again
    assert code == 0, err
    assert "skip   b seed=0" in out and evaluated.evals[0].info.run_id in out and "SKIPPED" in out
    code, out, err = evaluated.forced
    assert code == 0, err
    assert len(evaluated.evals) == 3  # first, --force, other weights: the skipped one made no run
    assert evaluated.evals[1].info.status == "FINISHED"
    assert evaluated.evals[1].data.tags["rcnn_lab.config_hash"] == evaluated.evals[0].data.tags["rcnn_lab.config_hash"]


def test_report_puts_each_evaluation_on_a_row_of_its_own(evaluated):
    from rcnn_lab.report import runs, summary

    rid = evaluated.trained.info.run_id
    df = runs(str(evaluated.exp_file))
    assert sorted(df["kind"]) == ["eval", "eval", "eval", "variant"]
    table = summary(df)
    rows = dict(zip(table["variant"], table["baseline"]))
    assert rows == {"b": True, f"b (eval run {rid[:8]})": False, "b (eval other seed.pth)": False}
    same = table.set_index("variant")
    assert same.loc[f"b (eval run {rid[:8]})", "segm_AP_mean"] == same.loc["b", "segm_AP_mean"]
    assert same.loc[f"b (eval run {rid[:8]})", "segm_AP_n"] == 1  # the newest of the two evaluations of it


def test_coco_eval_experiment_runs_torchvisions_model_with_its_coco_weights(tmp_path, new_store, monkeypatch):
    """experiments/coco_eval_torchvision.yaml + a torchvision-format file (built as torchvision builds the model it
    loads its COCO weights into: FrozenBatchNorm2d body, 3 trainable stages) on a COCO-format folder: every
    detection rcnn-lab eval saves is the one torchvision's own model makes on that image (5 classes and 128 px
    here, and 10 detections per image, so that a random model's detections are of the data's categories and the test
    stays fast)."""
    import torch
    from mlflow import MlflowClient
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    from rcnn_lab.config.types import Spec
    from rcnn_lab.data.export import export_shapes
    from rcnn_lab.engine.evaluate import detections_to_coco
    from rcnn_lab.registry import DATASETS
    from tests.conftest import EXPERIMENTS

    data = export_shapes(tmp_path / "coco", split="val", num_images=3, image_size=96)
    torch.manual_seed(0)
    tv = MaskRCNN(_resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3), num_classes=6,
                  min_size=128, max_size=128, box_score_thresh=0.0, box_detections_per_img=10).eval()
    torch.save(tv.state_dict(), tmp_path / "maskrcnn.pth")
    uri = new_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, out, err = cli("eval", str(EXPERIMENTS / "coco_eval_torchvision.yaml"), "--weights", str(tmp_path / "maskrcnn.pth"),
                         "--device", "cpu", "--set", f"data.val.images={data / 'images'}",
                         "--set", f"data.val.annotations={data / 'annotations.json'}", "--set", "data.num_workers=0",
                         "--set", "model.transform={min_size: 128, max_size: 128}",
                         "--set", "model.roi_heads.score_thresh=0.0", "--set", "model.roi_heads.detections_per_img=10",
                         "--set", "model.num_classes=6", "--no-progress")
    assert code == 0, err
    c = MlflowClient(uri)
    (ev,) = c.search_runs([c.get_experiment_by_name("coco_eval_torchvision").experiment_id])
    assert ev.data.tags["rcnn_lab.weights"] == f"loaded {len([k for k in tv.state_dict()])} of " \
        f"{len(tv.state_dict())} tensors"
    ours = detections(SimpleNamespace(client=c), ev.info.run_id, tmp_path)
    val = DATASETS.build(Spec("coco", {"images": str(data / "images"), "annotations": str(data / "annotations.json")}),
                         "data.val")
    theirs = []
    with torch.no_grad():
        for i in range(len(val)):
            image, target = val[i]
            theirs += detections_to_coco(tv([image]), [int(target["image_id"])], val.categories)
    assert len(ours) == len(theirs) == 3 * 10
    for a, b in zip(sorted(ours, key=lambda r: -r["score"]), sorted(theirs, key=lambda r: -r["score"])):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert abs(a["score"] - b["score"]) < 1e-6 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-3


def test_an_evaluation_whose_process_is_gone_is_marked_killed_and_done_again(evaluated, monkeypatch):
    """(Last in the module: it adds runs to the shared store.)"""
    import socket

    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.runner.evaluate_only import Weights, make_eval_plan

    monkeypatch.chdir(evaluated.root)
    rid, c = evaluated.trained.info.run_id, evaluated.client
    exp = load_experiment(evaluated.exp_file, ["eval.batch_size=1"])
    (planned,) = make_eval_plan(exp, None, Weights("--run", "", f"run:{rid}", "", {}, seed=0))
    dead = c.create_run(evaluated.exp_id, tags={"rcnn_lab.kind": "eval", "rcnn_lab.config_hash": planned.hash,
                                                "rcnn_lab.host": socket.gethostname(), "rcnn_lab.pid": "999999999"})
    code, out, err = cli("eval", str(evaluated.exp_file), "--run", rid, "--set", "eval.batch_size=1", "--no-progress")
    assert code == 0, err
    assert f"marked KILLED: evaluation {dead.info.run_id}" in out
    assert c.get_run(dead.info.run_id).info.status == "KILLED"
    (new,) = [r for r in c.search_runs([evaluated.exp_id], f"tags.`rcnn_lab.config_hash` = '{planned.hash}'")
              if r.info.run_id != dead.info.run_id]
    assert new.info.status == "FINISHED"
