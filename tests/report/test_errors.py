"""``report.errors.analyze``: the COCO error breakdown on a scene whose every value is worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rcnn_lab.report.errors import ERROR_TYPES, analyze

# categories 1 and 2 share a supercategory, 3 does not
CATS = [{"id": 1, "name": "a", "supercategory": "x"}, {"id": 2, "name": "b", "supercategory": "x"},
        {"id": 3, "name": "c", "supercategory": "y"}]


def _ann(i, cat, box):
    return {"id": i, "image_id": 1, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}


GT = {"images": [{"id": 1, "width": 200, "height": 200}], "categories": CATS, "annotations": [
    _ann(1, 1, [10, 10, 20, 20]),    # A: found, but only at IoU 0.6
    _ann(2, 1, [100, 10, 20, 20]),   # D: found only at IoU 0.33
    _ann(3, 1, [150, 150, 20, 20]),  # E: missed
    _ann(4, 2, [50, 50, 20, 20]),    # B: detected as category 1 (same supercategory)
    _ann(5, 3, [10, 100, 20, 20]),   # C: detected as category 1 (other supercategory)
]}


def _det(box, score, cat=1):
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


DETS = [
    _det([10, 10, 20, 12], 0.9),     # on A, IoU 240/400 = 0.6 (a TP at 0.5, not at 0.75)
    _det([50, 50, 20, 20], 0.8),     # on B, wrong class (similar)
    _det([10, 100, 20, 20], 0.7),    # on C, wrong class (other)
    _det([100, 170, 20, 20], 0.6),   # background
    _det([110, 10, 20, 20], 0.5),    # on D, IoU 200/600 = 0.33
]


def test_breakdown_matches_the_hand_computed_precision_recall_steps():
    out = analyze(GT, DETS, "bbox")
    b = out["breakdown"]
    assert list(b) == list(ERROR_TYPES)
    # category 1 (3 GT): detections by score A, B, C, bg, D. 101 recall thresholds 0, .01, ..., 1;
    # recall 1/3 is reached at precision 1 (34 thresholds <= 0.333), 2/3 at the precision after D (33 thresholds)
    cat1 = {"C75": 0.0, "C50": 34 / 101, "Loc": (34 + 33 * 2 / 5) / 101, "Sim": (34 + 33 * 2 / 4) / 101,
            "Oth": (34 + 33 * 2 / 3) / 101, "BG": 67 / 101}
    for t, v in cat1.items():  # categories 2 and 3 are never detected as themselves: 0 until FN
        assert b[t] == pytest.approx(v / 3, abs=1e-12), t
    assert b["FN"] == 1.0
    assert out["pr"][0.5].shape == (101,) and out["pr"][0.5][:34] == pytest.approx([1 / 3] * 34)
    assert out["pr"][0.5][34:] == pytest.approx([0.0] * 67) and not out["pr"][0.75].any()


def test_c50_and_c75_equal_cocoeval_ap50_and_ap75_and_no_supercategory_means_sim_is_loc():
    from pycocotools.coco import COCO

    from rcnn_lab.engine.evaluate import coco_metrics

    gt = COCO()
    gt.dataset = GT
    gt.createIndex()
    dets = [dict(d, bbox=[10, 10, 20, 18], score=0.95) if i == 0 else d for i, d in enumerate(DETS)]
    metrics, _ = coco_metrics(gt, dets, ["bbox"], backend="pycocotools")
    b = analyze(GT, dets, "bbox")["breakdown"]
    assert b["C50"] == pytest.approx(metrics["bbox_AP50"]) and b["C75"] == pytest.approx(metrics["bbox_AP75"])
    assert b["C75"] > 0
    plain = {**GT, "categories": [{"id": c["id"], "name": c["name"]} for c in CATS]}
    nosup = analyze(plain, DETS, "bbox")["breakdown"]
    assert nosup["Sim"] == pytest.approx(nosup["Loc"]) and nosup["Oth"] == pytest.approx((34 + 33 * 2 / 3) / 101 / 3)


def test_categories_without_ground_truth_are_left_out_and_no_gt_gives_nan():
    extra = {**GT, "categories": [*CATS, {"id": 4, "name": "d", "supercategory": "y"}]}
    assert analyze(extra, DETS, "bbox")["breakdown"] == pytest.approx(analyze(GT, DETS, "bbox")["breakdown"])
    empty = analyze({**GT, "annotations": []}, DETS, "bbox")
    assert all(math.isnan(v) for v in empty["breakdown"].values()) and np.isnan(empty["pr"][0.5]).all()
