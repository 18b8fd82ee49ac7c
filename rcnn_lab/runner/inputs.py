"""Datasets as MLflow run inputs (``log_inputs``): the runs table's Dataset column says what was trained on.

Each run logs its training and validation sets with the context tag ``mlflow.data.context``
(``training`` / ``validation``). ``name`` is the dataset type and split (``shapes/train``) or, for
COCO files, the annotation file's name; ``source`` the annotation file (``local``) or the generator
and its parameters (``code``); ``digest`` the first 12 hex digits of the SHA-256 of the dataset's
resolved config entry and counts (same data spec and size, same digest); ``profile`` the counts
(images, categories and annotations; for a training set only when its ground truth is already built).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rcnn_lab.config.types import to_plain
from rcnn_lab.runner import tags


def describe(spec: Any, dataset: Any, role: str) -> dict[str, Any]:
    """name / digest / source_type / source / profile of one dataset (``role``: train or val)."""
    plain = to_plain(spec)
    kind = str(plain.get("type", "dataset")) if isinstance(plain, dict) else "dataset"
    args = {k: v for k, v in plain.items() if k != "type"} if isinstance(plain, dict) else {}
    counts: dict[str, int] = {"images": len(dataset), "categories": len(getattr(dataset, "categories", []) or [])}
    # the validation GT is built now rather than at the first evaluation (same cost); a training set's only if cached
    gt = dataset.coco() if role == "val" and hasattr(dataset, "coco") else getattr(dataset, "_coco", None)
    if gt is not None:
        counts["annotations"] = len(gt.dataset.get("annotations", []))
    if "annotations" in args:
        name, source_type = str(args["annotations"]).replace("\\", "/").rsplit("/", 1)[-1], "local"
        source = {"uri": str(args["annotations"]), "images": str(args.get("images", ""))}
    else:
        name, source_type = f"{kind}/{args.get('split', role)}", "code"
        source = {"generator": f"rcnn_lab.data.{kind}", **args}
    blob = json.dumps({"spec": plain, "images": counts["images"]}, sort_keys=True, default=str)
    return {"name": name, "digest": hashlib.sha256(blob.encode()).hexdigest()[:12], "source_type": source_type,
            "source": json.dumps(source, default=str), "profile": json.dumps(counts)}


def dataset_inputs(config, train_set, val_set) -> list[dict[str, Any]]:
    """Both datasets of a run, described for ``log_inputs`` (plain values: a journal entry)."""
    return [{**describe(spec, dataset, role), "context": context}
            for spec, dataset, role, context in ((config.data.train, train_set, "train", "training"),
                                                 (config.data.val, val_set, "val", "validation"))]


def log_inputs(c, run_id: str, datasets: list[dict[str, Any]]) -> None:
    """Log ``dataset_inputs`` as the run's inputs (best effort: a store without dataset support just skips them)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entries = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"]),
                            tags=[InputTag(tags.DATASET_CONTEXT, d["context"])]) for d in datasets]
    try:
        c.log_inputs(run_id, datasets=entries)
    except Exception as exc:  # e.g. an old server without the inputs API: the run itself matters more
        from rcnn_lab.runner.tracking import unreachable

        if unreachable(exc):
            raise  # the journal retries it
