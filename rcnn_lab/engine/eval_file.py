"""The saved evaluation of a run: its detections and the ground truth they were scored against.

One gzip-compressed JSON file per run (MLflow artifact :data:`ARTIFACT`), self-contained so that
error analysis, precision-recall curves and per-category AP can be recomputed later without the
dataset and without retraining::

    {"format": 1, "iteration": 1500, "iou_types": ["bbox", "segm"], "image_ids": [...],
     "ground_truth": {"images": [...], "annotations": [...], "categories": [...]},   # COCO GT of the scored images
     "results": [{"image_id", "category_id", "bbox", "score", "segmentation"}, ...]}  # COCO results format

``results`` is exactly the list COCOeval scored (``engine.evaluate.detections_to_coco``, masks as
compressed RLE); ``ground_truth`` keeps only the images that were evaluated and their annotations.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ARTIFACT = "eval/detections.json.gz"
FORMAT = 1


def build(results: Sequence[dict], image_ids: Sequence[int], coco_gt: Any, iteration: int,
          iou_types: Sequence[str]) -> dict:
    """The eval file's content for ``results`` of ``image_ids`` scored against ``coco_gt`` (a COCO object)."""
    ids = sorted({int(i) for i in image_ids})
    keep = set(ids)
    ds = coco_gt.dataset
    gt = {
        "images": [im for im in ds.get("images", []) if int(im["id"]) in keep],
        "annotations": [a for a in ds.get("annotations", []) if int(a["image_id"]) in keep],
        "categories": list(ds.get("categories", [])),
    }
    return {"format": FORMAT, "iteration": int(iteration), "iou_types": list(iou_types), "image_ids": ids,
            "ground_truth": gt, "results": list(results)}


def write(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as f:
        json.dump(data, f, separators=(",", ":"))
    return path


def read(path: str | Path) -> dict:
    """An eval file; ``ValueError`` naming the file when it is not one."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not an rcnn-lab eval file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "results" not in data or "ground_truth" not in data:
        raise ValueError(f"{path} is not an rcnn-lab eval file (format {FORMAT} with results and ground_truth)")
    return data


def coco_gt(data: dict):
    """The file's ground truth as a ``pycocotools.coco.COCO`` object."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {**data["ground_truth"], "annotations": [dict(a) for a in data["ground_truth"]["annotations"]]}
        gt.createIndex()
    return gt
