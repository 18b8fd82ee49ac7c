"""torchvision's COCO weights (class rows by COCO category id) reordered to a dataset's contiguous labels."""

from __future__ import annotations

import torch

from rcnn_lab.engine.label_order import by_category_id, to_labels
from rcnn_lab.engine.weights import StateDict
from tests.conftest import TINY_MODEL

# COCO's category ids (80 of 1..90): rows 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are torchvision's "N/A"
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_torchvision_coco_weights_are_known_by_name_and_by_file_content():
    assert by_category_id("MaskRCNN_ResNet50_FPN_Weights.COCO_V1")
    assert by_category_id("FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1")
    assert by_category_id("sha256:bf2d0c1e" + "0" * 56)  # maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth's content
    assert not by_category_id("sha256:" + "0" * 64) and not by_category_id("run:abc")


def test_rows_move_to_labels_and_every_detection_is_the_same_under_its_categorys_label(write_yaml):
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.models.builder import build_model

    path = write_yaml("exp.yaml", "name: t\n" + TINY_MODEL)
    cfg = load_experiment(path, ["model.num_classes=91", "model.roi_heads.score_thresh=0.0"]).variants[0].config.model
    torch.manual_seed(0)
    coco = build_model(cfg).eval()  # class rows by category id, as torchvision's COCO weights
    state = StateDict(coco.state_dict())
    state.frozen_bn_eps = 0.0
    moved = to_labels(state, COCO_IDS)
    assert isinstance(moved, StateDict) and moved.frozen_bn_eps == 0.0
    w = "roi_heads.box_predictor.bbox_pred.weight"
    assert torch.equal(moved[w][4 * 12:4 * 13], state[w][4 * 13:4 * 14])  # label 12 is category 13 (stop sign)
    assert torch.equal(moved["roi_heads.box_predictor.cls_score.bias"][[0, 80, 81]],
                       state["roi_heads.box_predictor.cls_score.bias"][[0, 90, 12]])  # background first, N/A rows last
    mine = build_model(cfg).eval()
    mine.load_state_dict(moved)
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        (a,), (b,) = coco(image), mine(image)
    assert len(a["scores"]) > 0
    a_order, b_order = a["scores"].argsort(descending=True), b["scores"].argsort(descending=True)
    assert torch.allclose(a["scores"][a_order], b["scores"][b_order])
    assert torch.allclose(a["boxes"][a_order], b["boxes"][b_order], atol=1e-5)
    as_ids = [([0] + COCO_IDS + [12, 26, 29, 30, 45, 66, 68, 69, 71, 83])[label] for label in b["labels"][b_order].tolist()]
    assert as_ids == a["labels"][a_order].tolist()


def test_nothing_to_move():
    state = {"roi_heads.box_predictor.cls_score.bias": torch.zeros(6)}
    assert to_labels(state, [1, 2, 3, 4, 5]) is None  # ids 1..C in order: labels already are ids
    assert to_labels(state, [1, 2, 9]) is None  # an id without a row
    assert to_labels({}, [1]) is None
