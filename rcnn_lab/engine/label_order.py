"""torchvision's COCO detection weights order their classes by COCO category id; rcnn-lab's labels are positions.

torchvision's COCO weights (``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``, the Faster R-CNN ones, ...) have 91
class rows: background, each of COCO's 80 categories at the row of its id (1..90), and ``N/A`` at the 10 ids
COCO leaves unused, because torchvision's COCO dataset labels an object with its category id. An rcnn-lab
dataset labels it with its category's position (label ``i + 1`` is ``categories[i]``, the Dataset contract).
Loaded as they are, those weights would call a stop sign (id 13, row 13) what ``categories[12]`` is (id 14,
a parking meter). :func:`to_labels` reorders their predictor rows so that row ``i + 1`` is the row of
``categories[i]["id"]``: the same model with its classes renamed, so every detection (score, box, mask) is the
one torchvision's model makes, under the dataset's label of its category. ``engine.weights.load`` applies it
for the trainer (``model.weights``), ``rcnn-lab eval`` and ``rcnn-lab predict`` alike; it is a no-op on COCO
ids 1..C in order (a dataset exported by rcnn-lab).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

# predictor tensors (weight and bias) -> rows per class
PREDICTOR_ROWS = {"roi_heads.box_predictor.cls_score": 1, "roi_heads.box_predictor.bbox_pred": 4,
                  "roi_heads.mask_predictor.mask_fcn_logits": 1}


@lru_cache(maxsize=1)
def _by_category_id() -> tuple[frozenset[str], tuple[str, ...]]:
    """(names, file-hash prefixes) of torchvision's detection weights whose classes are COCO category ids."""
    from torchvision.models import detection
    from torchvision.models._api import WeightsEnum

    names, digests = set(), []
    for attr in dir(detection):
        enum = getattr(detection, attr)
        if not (isinstance(enum, type) and issubclass(enum, WeightsEnum)) or not attr.startswith(("MaskRCNN", "FasterRCNN")):
            continue
        for member in enum:
            categories = member.meta.get("categories") or []
            if len(categories) == 91 and "N/A" in categories:
                names.add(str(member))
                digests.append(member.url.rsplit("/", 1)[-1].rsplit(".", 1)[0].rsplit("-", 1)[-1])
    return frozenset(names), tuple(digests)


def by_category_id(identity: str) -> bool:
    """True for weights whose class rows are COCO category ids: torchvision's COCO detection weights, by name
    (``engine.weights`` identity) or by the content of their file (its sha256 starts with the hash in their file name)."""
    names, digests = _by_category_id()
    return identity in names or (identity.startswith("sha256:") and identity[len("sha256:"):].startswith(digests))


def to_labels(state: dict[str, torch.Tensor], category_ids: Sequence[int]) -> dict[str, torch.Tensor] | None:
    """``state`` with its predictor rows in label order (row ``i + 1`` <- row ``category_ids[i]``; background first,
    the unused rows last in their order, so the class count stays), or None when a category id has no row
    or nothing would move. Attributes of ``state`` (``engine.weights.StateDict``'s eps) are kept."""
    rows = next((state[f"{p}.bias"].shape[0] // n for p, n in PREDICTOR_ROWS.items() if f"{p}.bias" in state), None)
    ids = [int(i) for i in category_ids]
    if rows is None or not ids or min(ids) < 1 or max(ids) >= rows or len(set(ids)) != len(ids):
        return None
    order = [0, *ids, *(r for r in range(1, rows) if r not in set(ids))]
    if order == list(range(rows)):
        return None
    out = type(state)(state)
    if hasattr(state, "__dict__"):
        out.__dict__.update(state.__dict__)
    for prefix, per_class in PREDICTOR_ROWS.items():
        index = torch.tensor([r * per_class + k for r in order for k in range(per_class)])
        for suffix in ("weight", "bias"):
            name = f"{prefix}.{suffix}"
            if name in out and out[name].shape[0] == rows * per_class:
                out[name] = out[name].index_select(0, index)
    return out
