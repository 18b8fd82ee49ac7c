"""Drawing detections: the prediction gallery's panels and ``rcnn-lab predict``'s pictures (``draw_detections``).

The gallery is a fixed set of validation images drawn with ground truth and predictions.

The images are picked by position in the evaluated part of the validation set (evenly spaced over
the first ``eval.max_images`` images), so every variant and seed of an experiment draws the same
image ids. A panel is the image twice, side by side under a title strip that names each side ("ground
truth" | "prediction, score >= 0.5", with the image id and the training step when given): ground truth on
the left, the model's detections (score >= ``SCORE_THRESHOLD``) on the right, each as a filled mask, a box
and a label (``name`` for ground truth, ``name score`` for detections), drawn with
``torchvision.utils.draw_segmentation_masks`` and ``draw_bounding_boxes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SCORE_THRESHOLD = 0.5
MIN_HEIGHT = 256  # small images are scaled up (nearest) so labels stay readable
TITLE_PX = 22  # the strip above each half that says which side is which
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def gallery_indices(num_images: int, count: int, max_images: int | None = None) -> list[int]:
    """``count`` dataset positions evenly spaced over the first ``max_images`` (all by default) of ``num_images``."""
    n = num_images if max_images is None else min(num_images, max_images)
    if count <= 0 or n <= 0:
        return []
    if count >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, count)})


def _colour(label: int) -> tuple[int, int, int]:
    return PALETTE[(label - 1) % len(PALETTE)]


def _layer(image: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor, labels: Sequence[int],
           texts: Sequence[str]) -> torch.Tensor:
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    if len(labels) == 0:
        return image
    colours = [_colour(int(lab)) for lab in labels]
    if masks.numel():
        image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colours)
    return draw_bounding_boxes(image, boxes, labels=list(texts), colors=colours, width=2, **_label_style())


def _label_style() -> dict:
    """White text on a filled label box where torchvision supports it (>= 0.21), else its default."""
    import inspect

    from torchvision.utils import draw_bounding_boxes

    known = inspect.signature(draw_bounding_boxes).parameters
    return {"fill_labels": True, "label_colors": "white"} if "fill_labels" in known else {}


def _decode(results: Sequence[dict], height: int, width: int) -> torch.Tensor:
    from pycocotools import mask as mask_utils

    rles = [r["segmentation"] for r in results if "segmentation" in r]
    if len(rles) != len(results) or not rles:
        return torch.zeros((0, height, width), dtype=torch.bool)
    rles = [{**r, "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]} for r in rles]
    return torch.from_numpy(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool))


def _as_uint8(image: torch.Tensor) -> torch.Tensor:
    """A dataset image (float ``[3, H, W]`` in [0, 1]) as uint8 on the CPU."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _upscale(t: torch.Tensor, scale: int) -> torch.Tensor:
    return t.repeat_interleave(scale, -2).repeat_interleave(scale, -1) if scale > 1 else t


def _scale(height: int, min_height: int) -> int:
    return max(1, math.ceil(min_height / height)) if min_height > 0 else 1


def _detections(base: torch.Tensor, results: Sequence[dict], categories: Sequence[dict], score_threshold: float,
                scale: int, masks: torch.Tensor | None = None) -> torch.Tensor:
    """``base`` (uint8 ``[3, H, W]``, not yet scaled) with the detections of ``results`` drawn, scaled by ``scale``.

    ``masks``: the results' masks (bool ``[len(results), H, W]``) when the caller has them; else decoded from the RLE.
    """
    h, w = base.shape[-2:]
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    label_of = {int(c["id"]): i + 1 for i, c in enumerate(categories)}
    order = sorted((i for i, r in enumerate(results) if r["score"] >= score_threshold), key=lambda i: -results[i]["score"])
    shown = [results[i] for i in order]
    boxes = torch.tensor([r["bbox"] for r in shown], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    layer = _decode(shown, h, w) if masks is None else masks[order] if order else torch.zeros((0, h, w), dtype=torch.bool)
    return _layer(_upscale(base, scale), _upscale(layer, scale), boxes * scale,
                  [label_of.get(int(r["category_id"]), 0) for r in shown],
                  [f"{names.get(int(r['category_id']), r['category_id'])} {r['score']:.2f}" for r in shown])


def draw_detections(image: torch.Tensor, results: Sequence[dict], categories: Sequence[dict],
                    score_threshold: float = SCORE_THRESHOLD, min_height: int = 0,
                    masks: torch.Tensor | None = None) -> torch.Tensor:
    """The image with its detections drawn, as uint8 ``[3, H, W]`` (``rcnn-lab predict``'s pictures).

    ``results`` are the image's COCO result dicts (``engine.evaluate.detections_to_coco``): each
    with ``score >= score_threshold`` is a filled mask (when it has a ``segmentation``), a box and
    ``name score``. ``min_height``: smaller images are scaled up (nearest) to at least that height.
    ``masks``: bool ``[len(results), H, W]``, the results' masks already at hand (not decoded again).
    """
    return _detections(_as_uint8(image), results, categories, score_threshold, _scale(image.shape[-2], min_height),
                       masks)


def _titled(half: torch.Tensor, text: str) -> torch.Tensor:
    """``half`` (uint8 ``[3, H, W]``) under a white strip of ``TITLE_PX`` rows holding ``text`` in black."""
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (half.shape[-1], TITLE_PX), "white")
    ImageDraw.Draw(strip).text((4, 3), text, fill="black", font=ImageFont.load_default(size=14))
    top = torch.from_numpy(np.array(strip)).permute(2, 0, 1)
    return torch.cat([top, half], dim=1)


def draw_panel(image: torch.Tensor, target: dict[str, Any], results: Sequence[dict], categories: Sequence[dict],
               score_threshold: float = SCORE_THRESHOLD, step: int | None = None) -> np.ndarray:
    """One gallery panel as ``uint8 [TITLE_PX + H, 2W (+gap), 3]``: ground truth left, detections right, each
    under a title (``ground truth, image <id>`` | ``prediction, score >= 0.5, step <step>``).

    ``image`` is a dataset image (float ``[3, H, W]`` in [0, 1]), ``target`` its target (``boxes``,
    ``labels``, optional ``masks``), ``results`` the COCO result dicts of that image (see
    ``engine.evaluate.detections_to_coco``), ``categories`` the dataset's categories.
    """
    scale = _scale(image.shape[-2], MIN_HEIGHT)
    base = _as_uint8(image)
    h, w = base.shape[-2:]
    gt_labels = [int(v) for v in target["labels"].tolist()]
    gt_masks = target.get("masks", torch.zeros((0, h, w)))
    gt_masks = gt_masks if len(gt_masks) == len(gt_labels) else torch.zeros((0, h, w))
    gt = _layer(_upscale(base, scale), _upscale(torch.as_tensor(gt_masks), scale),
                torch.as_tensor(target["boxes"]).float().cpu() * scale,
                gt_labels, [categories[lab - 1].get("name", str(lab)) if 0 < lab <= len(categories) else str(lab)
                            for lab in gt_labels])
    pred = _detections(base, results, categories, score_threshold, scale)
    image_id = target.get("image_id")
    gt = _titled(gt, "ground truth" + (f", image {int(image_id)}" if image_id is not None else ""))
    pred = _titled(pred, f"prediction, score >= {score_threshold:g}" + (f", step {step}" if step is not None else ""))
    gap = torch.full((3, gt.shape[1], 4), 255, dtype=torch.uint8)
    return torch.cat([gt, gap, pred], dim=2).permute(1, 2, 0).contiguous().numpy()
