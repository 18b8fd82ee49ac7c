"""COCO evaluation: result conversion, metric parity with pycocotools, empty results, end-to-end ``evaluate``."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from rcnn_lab.engine.evaluate import (
    AGNOSTIC_STATS,
    STAT_NAMES,
    coco_metrics,
    detections_to_coco,
    evaluate,
    metric_names,
)

# pycocotools' decode under numpy 2 warns about ``__array__(copy=...)``; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 9, "name": "triangle"}]
SIZES = [(64, 64), (64, 64), (48, 64), (64, 48), (128, 128)]  # (height, width); the last holds a large object


def _blob(rng: np.random.Generator, h: int, w: int, lo: int, hi: int) -> np.ndarray:
    """A random filled ellipse or rectangle, uint8 ``[h, w]``."""
    bh, bw = (int(v) for v in rng.integers(lo, min(hi, h - 2, w - 2) + 1, size=2))
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    m = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        m[y0:y0 + bh, x0:x0 + bw] = 1
    else:
        yy, xx = np.mgrid[:h, :w]
        cy, cx, ry, rx = y0 + bh / 2, x0 + bw / 2, bh / 2, bw / 2
        m[((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1] = 1
    return m


def _rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def make_gt(seed: int = 0) -> dict:
    """COCO dict: a few small images, RLE and one polygon segmentation, one crowd region, non-contiguous category ids."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i, (h, w) in enumerate(SIZES):
        image_id = 10 + i
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
        blobs = [_blob(rng, h, w, 100, 110)] if h >= 128 else [_blob(rng, h, w, 5, 36) for _ in range(int(rng.integers(2, 5)))]
        for m in blobs:
            rle = _rle(m)
            anns.append({"image_id": image_id, "category_id": int(rng.choice([3, 7, 9])), "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
    poly = [[4.0, 4.0, 30.0, 6.0, 12.0, 28.0]]
    rle = mask_utils.merge(mask_utils.frPyObjects(poly, 64, 64))
    anns.append({"image_id": 11, "category_id": 9, "segmentation": poly, "area": float(mask_utils.area(rle)),
                 "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
    crowd = _rle(_blob(rng, 64, 64, 20, 30))
    anns.append({"image_id": 10, "category_id": 3, "segmentation": crowd, "area": float(mask_utils.area(crowd)),
                 "bbox": mask_utils.toBbox(crowd).tolist(), "iscrowd": 1})
    for k, a in enumerate(anns):
        a["id"] = k + 1
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def pyco_gt(data: dict) -> COCO:
    gt = COCO()
    gt.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def make_detections(gt: dict, seed: int) -> list[dict]:
    """Results like ``detections_to_coco`` gives: perturbed GT (shifted masks, noisy boxes, some wrong classes), duplicates, false positives."""
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        h, w = sizes[a["image_id"]]
        if rng.random() < 0.15:
            continue  # missed
        seg = a["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else dict(seg)
        m = np.roll(mask_utils.decode(rle), tuple(int(v) for v in rng.integers(-3, 4, size=2)), axis=(0, 1))
        for _ in range(2 if rng.random() < 0.2 else 1):
            box = np.array(mask_utils.toBbox(_rle(m))) + rng.normal(0, 1.5, 4)
            box[2:] = np.maximum(box[2:], 1.0)
            cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice([3, 7, 9]))
            out.append({"image_id": a["image_id"], "category_id": cat, "bbox": box.tolist(),
                        "score": float(rng.random()), "segmentation": _rle(m)})
    for im in gt["images"]:
        for _ in range(int(rng.integers(0, 4))):
            m = _blob(rng, im["height"], im["width"], 4, 40)
            out.append({"image_id": im["id"], "category_id": int(rng.choice([3, 7, 9])),
                        "bbox": mask_utils.toBbox(_rle(m)).tolist(), "score": float(rng.random()) * 0.6,
                        "segmentation": _rle(m)})
    return out


def reference_stats(gt: dict, results: list[dict], iou_type: str, use_cats: int = 1) -> np.ndarray:
    """pycocotools' own 12 stats; segm results without box, bbox results without mask (the module's convention)."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    res = [{k: v for k, v in r.items() if k != drop} for r in copy.deepcopy(results)]
    coco_gt = pyco_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(res), iouType=iou_type)
        ev.params.useCats = use_cats
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


# --- detections_to_coco --------------------------------------------------------------------------

def test_detections_to_coco_maps_labels_boxes_and_masks():
    probs = torch.zeros(3, 1, 20, 30)
    probs[0, 0, 2:8, 3:12] = 0.9
    probs[1, 0, 10:19, 0:5] = 0.6
    probs[1, 0, 0:3, 0:3] = 0.4  # below the threshold
    probs[2, 0, 5, 5] = 0.51
    outputs = [
        {"boxes": torch.tensor([[3.0, 2.0, 12.0, 8.0], [0.0, 10.0, 5.5, 19.0], [5.0, 5.0, 6.0, 6.0]]),
         "scores": torch.tensor([0.9, 0.5, 0.25]), "labels": torch.tensor([1, 2, 3]), "masks": probs},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 1, 20, 30)},
    ]
    res = detections_to_coco(outputs, [42, 43], CATEGORIES)
    assert [r["category_id"] for r in res] == [3, 7, 9]
    assert {r["image_id"] for r in res} == {42}
    assert res[1]["bbox"] == pytest.approx([0.0, 10.0, 5.5, 9.0])
    assert [r["score"] for r in res] == pytest.approx([0.9, 0.5, 0.25])
    for r, p in zip(res, probs):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [20, 30]
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), (p[0] > 0.5).numpy().astype(np.uint8))
    json.dumps(res)  # JSON-serialisable
    no_masks = [{k: v for k, v in outputs[0].items() if k != "masks"}]
    assert all("segmentation" not in r for r in detections_to_coco(no_masks, [1], CATEGORIES))


def test_detections_to_coco_drops_labels_without_a_category():
    out = [{"boxes": torch.ones(2, 4), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([4, 2])}]
    res = detections_to_coco(out, [1], CATEGORIES)
    assert [r["category_id"] for r in res] == [CATEGORIES[1]["id"]] and res[0]["score"] == pytest.approx(0.8)
    only_spare = [{"boxes": torch.ones(1, 4), "scores": torch.ones(1), "labels": torch.tensor([4])}]
    assert detections_to_coco(only_spare, [1], CATEGORIES) == []


# --- coco_metrics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_metrics_match_pycocotools(seed, backend):
    gt = make_gt(seed)
    results = make_detections(gt, seed + 100)
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    coco_gt = pyco_gt(gt)
    metrics, per_class = coco_metrics(coco_gt, results, per_class=True, backend=backend)
    assert list(metrics) == metric_names()
    assert all(type(v) is float for v in metrics.values())
    for iou_type in ("bbox", "segm"):
        ref = reference_stats(gt, results, iou_type)
        ours = np.array([metrics[f"{iou_type}_{s}"] for s in STAT_NAMES])
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6, err_msg=f"{backend} {iou_type}")
        assert 0.0 < metrics[f"{iou_type}_AP"] < 1.0
        assert set(per_class[iou_type]) == {"circle", "square", "triangle"}
    assert results == results_before and coco_gt.dataset == gt_before  # nothing mutated


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_class_agnostic_metrics_match_pycocotools_use_cats_0(backend):
    gt = make_gt(1)
    results = make_detections(gt, 101)
    metrics, _ = coco_metrics(pyco_gt(gt), results, backend=backend, class_agnostic=True)
    assert list(metrics) == metric_names(class_agnostic=True)
    for iou_type in ("bbox", "segm"):
        ref = reference_stats(gt, results, iou_type, use_cats=0)
        ours = [metrics[f"{iou_type}_agnostic_{s}"] for s in AGNOSTIC_STATS]
        np.testing.assert_allclose(ours, ref[:3], rtol=0, atol=1e-6, err_msg=f"{backend} {iou_type}")
        np.testing.assert_allclose(metrics[f"{iou_type}_AP"], reference_stats(gt, results, iou_type)[0], atol=1e-6)


def test_class_agnostic_ap_ignores_wrong_labels():
    gt = make_gt(5)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}

    def rle(a: dict) -> dict:  # the ground truth's polygon as the RLE a model's result would carry
        seg = a["segmentation"]
        return _rle(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, *sizes[a["image_id"]])))) if isinstance(seg, list) else seg

    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": rle(a)} for a in gt["annotations"] if not a["iscrowd"]]
    wrong = [{**r, "category_id": {3: 7, 7: 9, 9: 3}[r["category_id"]]} for r in perfect]
    right, _ = coco_metrics(pyco_gt(gt), perfect, class_agnostic=True)
    mislabelled, _ = coco_metrics(pyco_gt(gt), wrong, class_agnostic=True)
    for t in ("bbox", "segm"):
        assert right[f"{t}_AP"] == pytest.approx(1.0) and right[f"{t}_agnostic_AP"] == pytest.approx(1.0)
        assert mislabelled[f"{t}_AP"] == 0.0  # every label wrong: nothing matches its class
        assert mislabelled[f"{t}_agnostic_AP"] == pytest.approx(1.0)  # ... but every object is found and outlined


def test_backends_agree_on_per_class_and_subsets():
    gt = make_gt(3)
    results = make_detections(gt, 7)
    coco_gt = pyco_gt(gt)
    fast = coco_metrics(coco_gt, results, per_class=True, backend="faster", image_ids=[10, 12])
    ref = coco_metrics(coco_gt, results, per_class=True, backend="pycocotools", image_ids=[10, 12])
    assert fast[0] == pytest.approx(ref[0], abs=1e-6)
    for t in ("bbox", "segm"):
        assert fast[1][t] == pytest.approx(ref[1][t], abs=1e-6)
    assert fast[1]["bbox"]["triangle"] == -1.0  # no triangle ground truth in images 10 and 12
    assert fast[0]["bbox_APl"] == -1.0  # no large object in images 10 and 12: COCO's -1 is kept


def test_empty_results_give_zeros():
    coco_gt = pyco_gt(make_gt(0))
    metrics, per_class = coco_metrics(coco_gt, [], per_class=True)
    assert metrics == dict.fromkeys(metric_names(), 0.0)
    assert coco_metrics(coco_gt, [], class_agnostic=True)[0] == dict.fromkeys(metric_names(class_agnostic=True), 0.0)
    assert per_class == {t: {"circle": 0.0, "square": 0.0, "triangle": 0.0} for t in ("bbox", "segm")}
    bbox_only = [{"image_id": 10, "category_id": 3, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.5}]
    metrics, _ = coco_metrics(coco_gt, bbox_only, backend="pycocotools")
    assert all(metrics[f"segm_{s}"] == 0.0 for s in STAT_NAMES)


def test_coco_metrics_rejects_bad_arguments():
    coco_gt = pyco_gt(make_gt(0))
    with pytest.raises(ValueError, match="backend"):
        coco_metrics(coco_gt, [], backend="detectron")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iou_types"):
        coco_metrics(coco_gt, [], iou_types=("keypoints",))
    with pytest.raises(ValueError, match="image id 999"):
        coco_metrics(coco_gt, [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])


# --- evaluate ----------------------------------------------------------------------------------------

class TinyDataset:
    """Only what evaluation reads: ``categories`` and ``coco()``."""

    def __init__(self, data: dict):
        self.data = data
        self.categories = copy.deepcopy(CATEGORIES)

    def coco(self) -> COCO:
        return pyco_gt(self.data)


class GroundTruthModel(nn.Module):
    """Returns the ground truth (non-crowd) of the image whose id is encoded in pixel [0, 0, 0] as ``id / 100``."""

    def __init__(self, data: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.head = nn.Linear(1, 1)
        self.sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        self.anns = [a for a in data["annotations"] if not a["iscrowd"]]
        self.seen: list[int] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert not self.training and torch.is_inference_mode_enabled()
        label = {c["id"]: i + 1 for i, c in enumerate(CATEGORIES)}
        out = []
        for img in images:
            image_id = round(float(img[0, 0, 0]) * 100)
            self.seen.append(image_id)
            h, w = self.sizes[image_id]
            anns = [a for a in self.anns if a["image_id"] == image_id]
            masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
                                       if isinstance(a["segmentation"], list) else a["segmentation"]) for a in anns]
            boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]).reshape(-1, 4)
            out.append({"boxes": boxes, "scores": torch.linspace(1.0, 0.5, len(anns)),
                        "labels": torch.tensor([label[a["category_id"]] for a in anns], dtype=torch.int64),
                        "masks": torch.from_numpy(np.stack(masks)).float()[:, None] if masks else torch.zeros(0, 1, h, w)})
        return out


def _loader(data: dict, batch_size: int = 2) -> list[tuple[list[torch.Tensor], list[dict]]]:
    items = [(torch.full((3, im["height"], im["width"]), im["id"] / 100), {"image_id": im["id"]}) for im in data["images"]]
    return [([i for i, _ in items[k:k + batch_size]], [t for _, t in items[k:k + batch_size]])
            for k in range(0, len(items), batch_size)]


def test_evaluate_perfect_model_scores_one_and_restores_modes():
    data = make_gt(0)
    model = GroundTruthModel(data)
    model.head.eval()  # a submodule kept in eval mode stays so
    result = evaluate(model, _loader(data), TinyDataset(data), "cpu")
    m = result.metrics
    for t in ("bbox", "segm"):
        assert m[f"{t}_AP"] == pytest.approx(1.0) and m[f"{t}_AP50"] == pytest.approx(1.0)
        assert m[f"{t}_AR100"] == pytest.approx(1.0)
        assert result.per_class[t] == pytest.approx({"circle": 1.0, "square": 1.0, "triangle": 1.0})
    assert m["eval_images_per_s"] > 0 and m["eval_time_s"] > 0
    assert model.training and not model.head.training
    assert model.seen == [im["id"] for im in data["images"]]


def test_evaluate_max_images_scores_only_predicted_images():
    data = make_gt(1)
    model = GroundTruthModel(data)
    model.eval()
    result = evaluate(model, _loader(data), TinyDataset(data), torch.device("cpu"), iou_types=("segm",), max_images=3,
                      per_class=False, backend="pycocotools")
    assert model.seen == [10, 11, 12] and not model.training
    assert set(result.metrics) == {*metric_names(["segm"]), "eval_images_per_s", "eval_time_s"}
    assert result.metrics["segm_AP"] == pytest.approx(1.0) and result.per_class == {}
