"""Training from torchvision's COCO weights (class rows by COCO category id) on a dataset whose categories are
COCO ids: the trainer loads through ``engine.weights.load`` as ``rcnn-lab eval`` and ``predict`` do, so its first
model is torchvision's model under the dataset's labels; a ``num_classes`` that changes the predictors' shape
keeps them fresh. The tiny model (ResNet-18 at 64 px) with 91 classes, seeded, stands in for the COCO_V1 file
in torch's hub cache (no download); the data is an exported shapes folder with its category ids renamed.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from rcnn_lab.engine import weights as w
from rcnn_lab.engine.label_order import to_labels
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.engine.trainer import Trainer
from rcnn_lab.models.builder import build_model
from tests.conftest import EXPERIMENTS, TINY_MODEL

COCO_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"  # torchvision's download of MaskRCNN_ResNet50_FPN_Weights.COCO_V1
RENAMED = {1: 18, 2: 1, 3: 44, 4: 3, 5: 62}  # shapes' category ids -> COCO ids (dog, person, bottle, car, chair)
PREDICTORS = {f"roi_heads.{p}.{s}" for p in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                             "mask_predictor.mask_fcn_logits") for s in ("weight", "bias")}


def experiment(folder, num_classes) -> object:
    path = folder / f"exp{num_classes}.yaml"
    path.write_text(f"""base: {EXPERIMENTS / 'base.yaml'}
name: coco_ids
{TINY_MODEL}
data:
  train: {{type: coco, images: {folder / 'train' / 'images'}, annotations: {folder / 'train' / 'annotations.json'}}}
  val: {{type: coco, images: {folder / 'val' / 'images'}, annotations: {folder / 'val' / 'annotations.json'}}}
  batch_size: 2
train: {{iterations: 1, device: cpu, checkpoint_every: 0}}
""")
    return load_experiment(path, [f"model.num_classes={num_classes}", "model.weights=coco",
                                  "model.roi_heads.score_thresh=0.0"]).variants[0].config


@pytest.fixture(scope="module")
def coco_ids(tmp_path_factory):
    """(folder, torch home): shapes exported in COCO format with COCO category ids; the seeded tiny model with
    91 classes saved as torchvision's COCO_V1 file in that torch home's hub cache."""
    from rcnn_lab.data.export import export_shapes

    folder = tmp_path_factory.mktemp("coco_ids")
    for split, n in (("train", 4), ("val", 2)):
        export_shapes(folder / split, split, num_images=n, image_size=64)
        ann = folder / split / "annotations.json"
        data = json.loads(ann.read_text())
        for c in data["categories"]:
            c["id"] = RENAMED[c["id"]]
        for a in data["annotations"]:
            a["category_id"] = RENAMED[a["category_id"]]
        ann.write_text(json.dumps(data))
    home = folder / "torch"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    cfg = experiment(folder, 91)
    torch.manual_seed(2024)
    torch.save(build_model(cfg.model).state_dict(), home / "hub" / "checkpoints" / COCO_FILE)
    return folder, home


@pytest.mark.slow
def test_training_starts_from_torchvisions_model_under_the_datasets_labels(coco_ids, tmp_path, monkeypatch):
    folder, home = coco_ids
    monkeypatch.setenv("TORCH_HOME", str(home))
    cfg = experiment(folder, 91)
    trainer = Trainer(cfg, tmp_path / "out")
    ids = [c["id"] for c in trainer.train_set.categories]
    assert ids == sorted(RENAMED.values())  # label i + 1 is categories[i]: not the rows of those ids
    report = trainer.weights_report
    assert report.reordered and "reordered from COCO category ids" in report.source
    assert not report.fresh and not report.missing and report.identity == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    state, _ = w.read_state("coco")
    moved, own = to_labels(state, ids), trainer.model.state_dict()
    assert all(torch.equal(own[n], moved[n]) for n in PREDICTORS)
    assert not torch.equal(own["roi_heads.box_predictor.cls_score.weight"], state["roi_heads.box_predictor.cls_score.weight"])
    assert torch.equal(own["roi_heads.box_predictor.cls_score.weight"][1 + ids.index(18)],
                       state["roi_heads.box_predictor.cls_score.weight"][18])  # the dog's label holds the dog's row
    # torchvision's model: the same file loaded as it is (class rows by category id), same backbone defaults and eps
    coco = build_model(cfg.model)
    w.apply(coco, "coco")  # no categories: no reordering
    image = [trainer.val_set[0][0]]
    with torch.no_grad():
        (a,), (b,) = coco.eval()(image), trainer.model.eval()(image)
    assert len(a["scores"]) > 0
    a_order, b_order = a["scores"].argsort(descending=True), b["scores"].argsort(descending=True)
    assert torch.allclose(a["scores"][a_order], b["scores"][b_order])
    assert torch.allclose(a["boxes"][a_order], b["boxes"][b_order], atol=1e-4)
    others = [r for r in range(1, 91) if r not in ids]
    as_ids = [([0, *ids, *others])[label] for label in b["labels"][b_order].tolist()]
    assert as_ids == a["labels"][a_order].tolist()  # every detection is torchvision's, under its category's label


@pytest.mark.slow
def test_a_class_count_that_changes_the_predictors_keeps_them_fresh(coco_ids, tmp_path, monkeypatch):
    folder, home = coco_ids
    monkeypatch.setenv("TORCH_HOME", str(home))
    trainer = Trainer(experiment(folder, 6), tmp_path / "six")
    report = trainer.weights_report
    assert not report.reordered and {n for n, _, _ in report.fresh} == PREDICTORS and "(91 -> 6 classes)" in report.summary()
    cfg = experiment(folder, 6)
    plain = Trainer(replace(cfg, model=replace(cfg.model, weights=None)), tmp_path / "plain").model.state_dict()
    own = trainer.model.state_dict()
    assert all(torch.equal(own[n], plain[n]) for n in PREDICTORS)  # the seed's, as without weights
    state, _ = w.read_state("coco")
    assert all(torch.equal(own[n], state[n]) for n in report.loaded)
