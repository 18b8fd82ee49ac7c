"""Why a variant scores what it does: COCO error breakdown, precision-recall curves and per-category AP.

Computed from what every run saved (``eval/detections.json.gz``, see ``engine.eval_file``, and
``eval/per_class.json``); nothing is retrained or re-run through a model.

**Error breakdown** (Hoiem et al., "Diagnosing error in object detectors", as COCO's ``analyze``
and Detectron's / MMDetection's ``coco_error_analysis`` compute it). Seven cumulative APs, each at
maxDets 100 over all areas, from pycocotools' ``COCOeval``:

* ``C75`` / ``C50``: AP at IoU 0.75 / 0.5;
* ``Loc``: AP at IoU 0.1 (localisation errors forgiven, duplicates still count);
* ``Sim``: also forgiving confusion with a category of the same supercategory (those GT become
  ignore regions of the detected category);
* ``Oth``: also forgiving confusion with any category;
* ``BG``: also forgiving every remaining false positive (precision 1 wherever recall is reached);
* ``FN``: 1.0: what is left is missed objects.

Each step's gain is what that error type costs (``Loc - C50`` is the AP lost to poor localisation,
``1 - BG`` to objects never detected). Categories without ground truth in the evaluated images are
left out of the means (COCO's AP does the same; MMDetection's script counts them as 0).

**Precision-recall curves** at IoU 0.5 and 0.75 are the ``C50`` and ``C75`` curves (precision at
COCO's 101 recall thresholds, averaged over categories). Every quantity is averaged over a
variant's seeds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.report.data import fetch_artifacts, latest_finished

ERROR_TYPES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
RECALLS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs


def _cocoeval(gt: dict, results: list[dict], iou_type: str, iou_thrs: Sequence[float], image_ids: list[int],
              cat_ids: list[int]) -> np.ndarray:
    """pycocotools COCOeval precision ``[T, R, K]`` (all areas, maxDets 100) for ``cat_ids``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not results:
            return np.zeros((len(iou_thrs), len(RECALLS), len(cat_ids)))
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        ev.params.imgIds, ev.params.catIds = list(image_ids), list(cat_ids)
        ev.params.iouThrs, ev.params.maxDets = np.asarray(iou_thrs, float), [100]
        ev.evaluate()
        ev.accumulate()
    return np.asarray(ev.eval["precision"])[:, :, :, 0, 0]


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    drop, need = ("bbox", "segmentation") if iou_type == "segm" else ("segmentation", "bbox")
    return [{k: v for k, v in r.items() if k != drop} for r in results if need in r]


def _forgiving(gt: dict, cat_id: int, others: set[int]) -> dict:
    """GT where annotations of ``others`` become ignored (crowd) regions of ``cat_id``: confusing them is forgiven."""
    anns = [{**a, "ignore": 1, "iscrowd": 1, "category_id": cat_id} if a["category_id"] in others else dict(a)
            for a in gt["annotations"]]
    return {**gt, "annotations": anns}


def analyze(gt: dict, results: list[dict], iou_type: str, image_ids: Sequence[int] | None = None) -> dict:
    """Error breakdown and PR curves of one run's detections (``gt``: a COCO GT dict; ``results``: COCO results).

    Returns ``{"breakdown": {C75..FN: AP}, "pr": {0.5: precision[101], 0.75: precision[101]}}``.
    """
    gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    ids = sorted({int(i) for i in (image_ids if image_ids is not None else [im["id"] for im in gt["images"]])})
    res = _results_for(results, iou_type)
    cats = {int(c["id"]): c for c in gt["categories"]}
    present = sorted({int(a["category_id"]) for a in gt["annotations"] if int(a["image_id"]) in set(ids)} & set(cats))
    if not present:
        return {"breakdown": dict.fromkeys(ERROR_TYPES, float("nan")), "pr": {0.5: np.full(len(RECALLS), np.nan),
                                                                              0.75: np.full(len(RECALLS), np.nan)}}
    ps = np.zeros((len(ERROR_TYPES), len(RECALLS), len(present)))
    ps[:3] = _cocoeval(gt, res, iou_type, [0.75, 0.5, 0.1], ids, present)
    for k, cat in enumerate(present):
        own = [r for r in res if int(r["category_id"]) == cat]
        sup = cats[cat].get("supercategory")
        similar = {c for c, d in cats.items() if c != cat and sup is not None and d.get("supercategory") == sup}
        ps[3, :, k] = _cocoeval(_forgiving(gt, cat, similar), own, iou_type, [0.1], ids, [cat])[0, :, 0]
        ps[4, :, k] = _cocoeval(_forgiving(gt, cat, set(cats) - {cat}), own, iou_type, [0.1], ids, [cat])[0, :, 0]
    ps[ps == -1] = 0
    ps[5] = ps[4] > 0
    ps[6] = 1.0
    return {"breakdown": {t: float(ps[i].mean()) for i, t in enumerate(ERROR_TYPES)},
            "pr": {0.75: ps[0].mean(axis=1), 0.5: ps[1].mean(axis=1)}}


def _chosen(df: pd.DataFrame, seed: int | None) -> pd.DataFrame:
    done = latest_finished(df)
    if seed is not None:
        done = done[done["seed"] == seed]
        if done.empty:
            seeds = sorted({int(s) for s in latest_finished(df)["seed"].dropna()})
            raise ConfigError([Problem("--seed", f"no finished run with seed {seed} (seeds: {', '.join(map(str, seeds))})")])
    return done


def errors(df: pd.DataFrame, iou_types: Sequence[str] | None = None, seed: int | None = None,
           tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per (experiment, variant, iou_type): ``runs``, the seven ``ERROR_TYPES`` APs and ``pr50`` /
    ``pr75`` (precision arrays at ``RECALLS``), averaged over the variant's newest finished runs (or one ``seed``).

    ``df`` is a ``runs()`` frame. Raises ``ConfigError`` when no run saved its detections.
    """
    from rcnn_lab.engine import eval_file

    done = _chosen(df, seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = fetch_artifacts(done, eval_file.ARTIFACT, tmp, tracking_uri)
        if not files:
            raise ConfigError([Problem("--errors", f"no finished run saved {eval_file.ARTIFACT} (runs logged before "
                                       "detections were saved); rerun them with --force")])
        per_run = {run_id: eval_file.read(path) for run_id, path in files.items()}
    rows = []
    for (experiment, variant), group in done.groupby(["experiment", "variant"], sort=False):
        datas = [per_run[r] for r in group["run_id"] if r in per_run]
        types = list(iou_types) if iou_types else list(dict.fromkeys(t for d in datas for t in d.get("iou_types", [])))
        for iou_type in types:
            found = [analyze(d["ground_truth"], d["results"], iou_type, d["image_ids"]) for d in datas
                     if iou_type in d.get("iou_types", [])]
            if not found:
                continue
            row = {"experiment": experiment, "variant": variant, "iou_type": iou_type, "runs": len(found)}
            row.update({t: float(np.mean([f["breakdown"][t] for f in found])) for t in ERROR_TYPES})
            row["pr50"] = np.mean([f["pr"][0.5] for f in found], axis=0)
            row["pr75"] = np.mean([f["pr"][0.75] for f in found], axis=0)
            rows.append(row)
    return pd.DataFrame(rows)


def per_class(df: pd.DataFrame, seed: int | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """Per-category AP (IoU .50:.95) from each run's ``eval/per_class.json``: one row per (experiment, variant,
    iou_type), one column per category, the mean over the variant's runs (categories without GT: NaN)."""
    done = _chosen(df, seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = fetch_artifacts(done, "eval/per_class.json", tmp, tracking_uri)
        loaded = {run_id: json.loads(Path(p).read_text()) for run_id, p in files.items()}
    if not any(loaded.values()):
        raise ConfigError([Problem("--per-class", "no finished run logged per-category AP; set eval.per_class: true")])
    rows = []
    for (experiment, variant), group in done.groupby(["experiment", "variant"], sort=False):
        runs_ = [loaded[r] for r in group["run_id"] if loaded.get(r)]
        for iou_type in dict.fromkeys(t for r in runs_ for t in r):
            values: dict[str, list[float]] = {}
            for r in runs_:
                for name, ap in r.get(iou_type, {}).items():
                    values.setdefault(name, []).append(np.nan if ap < 0 else ap)
            rows.append({"experiment": experiment, "variant": variant, "iou_type": iou_type,
                         **{name: float(np.nanmean(v)) if not np.isnan(v).all() else np.nan for name, v in values.items()}})
    return pd.DataFrame(rows)


IOU_NAMES = {"bbox": "boxes (bbox)", "segm": "masks (segm)"}


def plot_pr(err: pd.DataFrame, iou_type: str, path: str | Path) -> Path:
    """Precision-recall at IoU 0.5 and 0.75 (two panels), one line per variant."""
    from rcnn_lab.report.plots import _figure, _save

    rows = err[err["iou_type"] == iou_type]
    fig, _ = _figure(10.0, 4.2)
    fig.clear()
    axes = fig.subplots(1, 2)
    many = rows["experiment"].nunique() > 1
    for col, iou, a in (("pr50", 0.5, axes[0]), ("pr75", 0.75, axes[1])):
        for _, r in rows.iterrows():
            name = f"{r['experiment']}/{r['variant']}" if many else str(r["variant"])
            a.plot(RECALLS, r[col], label=f"{name} [{r['C50' if iou == 0.5 else 'C75']:.3f}]", linewidth=1.3)
        a.set_xlim(0, 1)
        a.set_ylim(0, 1.02)
        a.set_xlabel("recall")
        a.set_ylabel("precision")
        a.set_title(f"{IOU_NAMES.get(iou_type, iou_type)}: IoU {iou} (AP in brackets)", fontsize=10)
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_errors(err: pd.DataFrame, iou_type: str, path: str | Path) -> Path:
    """Stacked bars per variant: C75, then what each error type adds up to 1 (COCO's analyze colours)."""
    from rcnn_lab.report.plots import _figure, _save

    rows = err[err["iou_type"] == iou_type].reset_index(drop=True)
    many = rows["experiment"].nunique() > 1
    names = [f"{e}/{v}" if many else str(v) for e, v in zip(rows["experiment"], rows["variant"])]
    colours = ["#1f4e79", "#4f8fc0", "#3ca73c", "#f0b32d", "#d64d4d", "#9467bd", "#c8c8c8"]
    labels = ["C75", "C50 - C75", "Loc - C50", "Sim - Loc", "Oth - Sim", "BG - Oth", "FN: 1 - BG"]
    values = rows[list(ERROR_TYPES)].to_numpy(float)
    steps = np.diff(np.concatenate([np.zeros((len(rows), 1)), values], axis=1), axis=1)
    fig, ax = _figure(max(5.5, 0.9 * len(names) + 3.5), 4.5)
    bottom = np.zeros(len(rows))
    for i, label in enumerate(labels):
        ax.bar(names, steps[:, i], bottom=bottom, label=label, color=colours[i], edgecolor="black", linewidth=0.4)
        bottom += steps[:, i]
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP (cumulative)")
    ax.set_title(f"{IOU_NAMES.get(iou_type, iou_type)}: COCO error breakdown\n(each band: AP gained by forgiving that error)",
                 fontsize=10)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)
