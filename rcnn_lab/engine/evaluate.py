"""COCO evaluation: model outputs -> COCO results -> the 12 standard COCO stats per IoU type.

Three steps, kept apart so a distributed run can gather the detections of every rank between
the first two and the last:

* :func:`predict` runs the model over a loader and returns :class:`Predictions` (COCO result
  dicts, the evaluated image ids and the pure inference time). Predictions of several ranks
  combine by concatenating ``results`` and ``image_ids`` and summing the counters.
* :func:`coco_metrics` scores COCO results against a ground-truth ``COCO`` object.
* :func:`evaluate` does both for a model, a loader and a dataset (Dataset contract:
  ``categories`` and ``coco()``).

Metric names are stable: ``{iou_type}_{stat}`` with stat one of :data:`STAT_NAMES`
(``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl``), e.g. ``bbox_AP50`` or ``segm_ARl``.
Values are Python floats in [0, 1], or ``-1.0`` where COCO gives -1: no ground truth in that
area range (e.g. ``APl`` on a dataset without large objects). Without any detection of an IoU
type, every metric of that type is ``0.0`` (COCO's ``loadRes`` cannot load an empty list).

Two backends compute the same numbers: ``faster`` (faster-coco-eval, C++; the default) and
``pycocotools`` (the reference implementation). Detections are scored per IoU type the way
Detectron2 does: segm results go in without their box, so COCO takes the mask area for the
small/medium/large ranges, and bbox results without their mask. Neither backend mutates the
caller's ground truth or results: both work on shallow copies of the annotation dicts.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Backend = Literal["faster", "pycocotools"]
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
BACKENDS: tuple[str, ...] = ("faster", "pycocotools")
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""Names of COCOeval's 12 ``stats``, in order (AP/AR over IoU .50:.95 unless named; s/m/l area ranges)."""
AGNOSTIC_STATS: tuple[str, ...] = ("AP", "AP50", "AP75")
"""The stats also reported class-agnostically (``{iou_type}_agnostic_{stat}``) when asked for."""


def metric_names(iou_types: Iterable[str] = IOU_TYPES, class_agnostic: bool = False) -> list[str]:
    """The metric keys :func:`coco_metrics` returns for ``iou_types``, e.g. ``bbox_AP`` ... ``segm_ARl``.

    With ``class_agnostic``, each type also has ``{type}_agnostic_AP``, ``_AP50`` and ``_AP75``.
    """
    agnostic = AGNOSTIC_STATS if class_agnostic else ()
    return [name for t in iou_types for name in [f"{t}_{s}" for s in STAT_NAMES] + [f"{t}_agnostic_{s}" for s in agnostic]]


# --- model outputs -> COCO results -------------------------------------------------------------

def detections_to_coco(outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                       categories: Sequence[dict[str, Any]], mask_threshold: float = 0.5) -> list[dict]:
    """COCO result dicts for torchvision Mask R-CNN eval ``outputs`` (one dict per image).

    Each output has ``boxes`` ``[N, 4]`` xyxy, ``scores`` ``[N]``, ``labels`` ``[N]`` (contiguous,
    ``1..C``) and optionally ``masks`` ``[N, 1, H, W]`` probabilities. A result dict has
    ``image_id``, ``category_id`` (``categories[label - 1]["id"]``), ``bbox`` (xywh), ``score``
    and, when the output has masks, ``segmentation``: compressed RLE of ``masks > mask_threshold``
    with ``counts`` as ``str`` (JSON-serialisable). Tensors may be on any device / dtype.
    """
    from pycocotools import mask as mask_utils

    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids; give one image id per output")
    cat_ids = [int(c["id"]) for c in categories]
    results: list[dict] = []
    for output, image_id in zip(outputs, image_ids):
        labels = output["labels"].detach().to("cpu", torch.int64).tolist()
        if not labels:
            continue
        # labels with no category (a model with spare classes, like torchvision's 91 for COCO's 80)
        # are dropped: COCOeval ignores category ids that are absent from the ground truth anyway
        keep = [i for i, lab in enumerate(labels) if 1 <= lab <= len(cat_ids)]
        if len(keep) < len(labels):
            output = {k: v[keep] for k, v in output.items() if k in ("boxes", "scores", "labels", "masks")}
            labels = [labels[i] for i in keep]
            if not labels:
                continue
        boxes = output["boxes"].detach().to("cpu", torch.float64)
        boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
        scores = output["scores"].detach().to("cpu", torch.float64).tolist()
        rles: list[dict] | None = None
        if "masks" in output:
            masks = (output["masks"].detach()[:, 0] > mask_threshold).to("cpu", torch.uint8).numpy()
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # [H, W, N] Fortran order
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
        for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
            result = {"image_id": int(image_id), "category_id": cat_ids[label - 1], "bbox": box, "score": score}
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


# --- scoring ------------------------------------------------------------------------------------

def _gt_dataset(coco_gt: Any) -> dict:
    """The GT's COCO dict with copied annotation dicts (COCOeval writes keys into them)."""
    ds = coco_gt.dataset
    return {**ds, "annotations": [dict(a) for a in ds.get("annotations", [])]}


def _results_for(results: Sequence[dict], iou_type: str) -> list[dict]:
    """Copies of the results usable for ``iou_type`` (segm without box, bbox without mask; see module doc)."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    need = "segmentation" if iou_type == "segm" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results if need in r]


def _run_cocoeval(coco_gt: Any, results: list[dict], iou_type: str, image_ids: list[int] | None,
                  backend: str, use_cats: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Evaluate, accumulate, summarize; returns (12 stats, precision [T,R,K,A,M], category ids of K).

    ``use_cats=False`` is COCOeval's ``useCats = 0``: a detection may match ground truth of any category.
    Works on shallow copies (``loadRes`` and COCOeval write keys into the dicts they get), so the
    same ``results`` can be scored again.
    """
    gt, results = _gt_dataset(coco_gt), [dict(r) for r in results]
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        coco_gt = COCO(gt)
        ev = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            ev = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
    if image_ids is not None:
        ev.params.imgIds = image_ids
    ev.params.useCats = int(use_cats)
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries may print the summary table
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)[: len(STAT_NAMES)]
    return stats, np.asarray(ev.eval["precision"]), [int(c) for c in ev.params.catIds]


def _class_keys(coco_gt: Any, cat_ids: Sequence[int]) -> dict[int, str]:
    """Category id -> per-class key: its name, or ``name (id)`` where names repeat."""
    names = {c: str(coco_gt.cats.get(c, {}).get("name", c)) for c in cat_ids}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    return {c: n if counts[n] == 1 else f"{n} ({c})" for c, n in names.items()}


def _per_class_ap(precision: np.ndarray) -> list[float]:
    """AP (IoU .50:.95, all areas, maxDets 100) per category index K of ``precision``; -1 without GT."""
    out = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out.append(float(p.mean()) if p.size else -1.0)
    return out


def coco_metrics(coco_gt: Any, results: Sequence[dict], iou_types: Sequence[str] = IOU_TYPES, per_class: bool = False,
                 backend: Backend = "faster", image_ids: Sequence[int] | None = None,
                 class_agnostic: bool = False) -> tuple[dict[str, float], dict]:
    """Score COCO ``results`` against ``coco_gt`` (a ``pycocotools.coco.COCO``; only ``.dataset`` and ``.cats`` are read).

    Returns ``(metrics, per_class)``: ``metrics`` maps :func:`metric_names` to floats (-1.0 where
    COCO gives -1, all 0.0 for an IoU type without detections; see the module docstring);
    ``per_class`` is ``{iou_type: {category name: AP}}`` (AP over IoU .50:.95, all areas; -1.0 for
    a category without ground truth in the evaluated images) when ``per_class``, else ``{}``.
    ``image_ids`` restricts evaluation to those images (e.g. the ones a capped run predicted);
    by default every GT image counts, so an image without results counts as all misses.
    ``backend``: ``faster`` (faster-coco-eval) or ``pycocotools``; they give equal numbers.
    ``class_agnostic`` adds ``{iou_type}_agnostic_AP/AP50/AP75``: the same detections scored with
    COCOeval's ``useCats = 0`` (any category matches). The gap to ``AP`` is what wrong labels cost;
    what remains below 1 is localisation, misses and duplicates.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO eval backend {backend!r}; use one of {', '.join(BACKENDS)}")
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types {list(iou_types)}: each must be one of {', '.join(IOU_TYPES)}")
    ids = sorted({int(i) for i in image_ids}) if image_ids is not None else None
    gt_images = {int(i) for i in coco_gt.imgs}
    stray = sorted({int(r["image_id"]) for r in results} - gt_images) or sorted(set(ids or ()) - gt_images)
    if stray:
        raise ValueError(f"image id {stray[0]} is not an image of the ground truth; results and image_ids must use "
                         "the dataset's image ids (target['image_id'])")
    metrics: dict[str, float] = {}
    classes: dict[str, dict[str, float]] = {}
    keys: dict[int, str] | None = None
    if ids is not None:
        allowed = set(ids)
        results = [r for r in results if int(r["image_id"]) in allowed]
    for iou_type in iou_types:
        res = _results_for(results, iou_type)
        if not res or ids == []:
            metrics.update({k: 0.0 for k in metric_names([iou_type], class_agnostic)})
            if per_class:
                cat_ids = sorted(int(c) for c in coco_gt.cats)
                keys = keys or _class_keys(coco_gt, cat_ids)
                classes[iou_type] = {keys[c]: 0.0 for c in cat_ids}
            continue
        stats, precision, cat_ids = _run_cocoeval(coco_gt, res, iou_type, ids, backend)
        metrics.update({f"{iou_type}_{s}": float(v) for s, v in zip(STAT_NAMES, stats)})
        if class_agnostic:
            agnostic = _run_cocoeval(coco_gt, res, iou_type, ids, backend, use_cats=False)[0]
            metrics.update({f"{iou_type}_agnostic_{s}": float(agnostic[STAT_NAMES.index(s)]) for s in AGNOSTIC_STATS})
        if per_class:
            keys = keys or _class_keys(coco_gt, cat_ids)
            classes[iou_type] = {keys[c]: ap for c, ap in zip(cat_ids, _per_class_ap(precision))}
    return metrics, classes


# --- running a model ----------------------------------------------------------------------------

@dataclass
class Predictions:
    """What :func:`predict` collects; concatenate ``results``/``image_ids`` and sum the rest to merge ranks."""

    results: list[dict] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    inference_time_s: float = 0.0
    """Model forward time only (CUDA-synchronised), without data loading, transfers and RLE encoding."""

    @property
    def num_images(self) -> int:
        """Number of images run through the model."""
        return len(self.image_ids)


@dataclass
class EvalResult:
    """Metrics (COCO stats plus ``eval_images_per_s`` and ``eval_time_s``) and per-class AP."""

    metrics: dict[str, float]
    per_class: dict = field(default_factory=dict)
    predictions: Predictions | None = None
    """The scored detections (on rank 0 under torchrun): what the gallery draws and the saved eval file holds."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict(model: nn.Module, loader: Iterable, categories: Sequence[dict[str, Any]], device: torch.device | str,
            max_images: int | None = None, amp_dtype: torch.dtype | None = None, progress: bool = False,
            mask_threshold: float = 0.5) -> Predictions:
    """Run ``model`` (already in eval mode, under inference mode) over ``loader``; COCO results of every image.

    ``loader`` yields ``(images, targets)`` lists; targets carry ``image_id`` (int or 0-d tensor).
    Stops after ``max_images`` images (the last batch is cut short). ``amp_dtype`` runs the
    forward under ``torch.autocast`` with that dtype.
    """
    device = torch.device(device)
    pred = Predictions()
    batches: Iterable = loader
    if progress:
        from tqdm import tqdm

        total = None
        with contextlib.suppress(TypeError):
            total = len(loader)  # type: ignore[arg-type]
        batches = tqdm(loader, total=total, desc="eval", unit="batch", leave=False)
    for images, targets in batches:
        if max_images is not None:
            left = max_images - pred.num_images
            if left <= 0:
                break
            images, targets = list(images)[:left], list(targets)[:left]
        ids = [int(t["image_id"]) for t in targets]
        images = [img.to(device, non_blocking=True) for img in images]
        _sync(device)
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        _sync(device)
        pred.inference_time_s += time.perf_counter() - tick
        pred.results.extend(detections_to_coco(outputs, ids, categories, mask_threshold))
        pred.image_ids.extend(ids)
    return pred


def evaluate(model: nn.Module, loader: Iterable, dataset: Any, device: torch.device | str,
             iou_types: Sequence[str] = IOU_TYPES, max_images: int | None = None, amp_dtype: torch.dtype | None = None,
             progress: bool = False, per_class: bool = True, backend: Backend = "faster",
             class_agnostic: bool = False) -> EvalResult:
    """COCO-evaluate ``model`` on ``loader`` over ``dataset`` (``categories`` and ``coco()``, Dataset contract).

    Puts the model in eval mode under ``torch.inference_mode`` and restores every submodule's
    train/eval flag afterwards. Only the predicted images are scored (matters with
    ``max_images``). ``metrics`` holds :func:`metric_names` ``(iou_types, class_agnostic)`` plus
    ``eval_images_per_s`` (images / pure forward time) and ``eval_time_s`` (wall time of the
    whole evaluation, scoring included).
    """
    started = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            pred = predict(model, loader, dataset.categories, device, max_images=max_images, amp_dtype=amp_dtype,
                           progress=progress)
    finally:
        for m, training in modes:
            m.training = training
    metrics, classes = coco_metrics(dataset.coco(), pred.results, iou_types, per_class=per_class, backend=backend,
                                    image_ids=pred.image_ids, class_agnostic=class_agnostic)
    metrics["eval_images_per_s"] = pred.num_images / pred.inference_time_s if pred.inference_time_s > 0 else 0.0
    metrics["eval_time_s"] = time.perf_counter() - started
    return EvalResult(metrics, classes, pred)
