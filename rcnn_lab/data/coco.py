"""COCO-format datasets: an images folder plus a COCO JSON file.

Segmentations may be polygons, compressed RLE (``counts`` a string) or uncompressed RLE
(``counts`` a list); all are decoded with ``pycocotools.mask``. An annotation without a
segmentation gets its box as mask.

Labels are contiguous: the selected category ids, sorted, become labels ``1..C``; ``categories``
keeps the original ids so evaluation maps predictions back.

Crowd annotations (``iscrowd: 1``): torchvision's Mask R-CNN treats every target box as an
instance, so by default (``crowd: drop``) they are left out of the items' targets, as
torchvision's reference scripts do, while ``coco()`` keeps them so COCOeval ignores detections
that match a crowd region. ``crowd: keep`` puts them in the targets with ``iscrowd = 1`` for
training code that handles them.

The checked index of a file is kept in an on-disk cache (``rcnn_lab.data.coco_cache``): later
builds of the same, unchanged file map it instead of parsing (``RCNN_LAB_CACHE=off`` turns it off).

The JSON is checked when the dataset is built (structure, ids, segmentations, and the limits of
``rcnn_lab.data.coco_checks`` before pycocotools sees any value), every listed image file must
exist and a sample of their headers is read (``rcnn_lab.data.coco_files``; ``check_images`` reads
them all), and a split its filters leave empty is refused, so mistakes fail before training starts. Problems name the JSON file,
the spec key (``annotations`` or ``images``, rooted at e.g. ``data.train`` by the registry) and
the entry at fault.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from rcnn_lab.data.coco_cache import load_or_parse
from rcnn_lab.data.coco_files import check_headers, check_listed
from rcnn_lab.data.coco_index import Progress
from rcnn_lab.data.coco_json import (
    ParsedCoco,
    is_number,
    load_coco_json,
    parse_checked,
    parse_coco_json,
    parse_fast,
    read_coco_bytes,
)
from rcnn_lab.data.images import ImageError, read_image
from rcnn_lab.errors import ConfigError, Problem, display_path
from rcnn_lab.registry import DATASETS

__all__ = ["CocoDataset", "coco", "coco_from_dict", "decode_segmentation", "load_coco_json", "read_rgb"]

_PROGRESS_BYTES = 64 * 2**20  # files this large print their build phases


def coco_from_dict(data: dict):
    """An in-memory ``pycocotools.coco.COCO`` for a COCO dict (index built quietly)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Mask uint8 ``[H, W]`` from polygons, compressed RLE or uncompressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools + numpy 2: "__array__ implementation doesn't accept a copy keyword"
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def read_rgb(path: str | Path) -> torch.Tensor:
    """An image file as uint8 ``[3, H, W]`` RGB, read by ``rcnn_lab.data.images.read_image`` (8-bit files round-trip exactly)."""
    return read_image(path).mul_(255.0).round_().to(torch.uint8)


class CocoDataset(Dataset):
    """Images folder + COCO JSON following the Dataset contract (see the module docstring).

    ``progress``: print one line per build phase on stderr; None: when the file is 64 MB or more.
    ``cache``: use the on-disk cache of the checked index (:mod:`rcnn_lab.data.coco_cache`; also
    off with ``RCNN_LAB_CACHE=off``). Not a config key: it changes no result.
    """

    def __init__(self, images: str | Path, annotations: str | Path, crowd: Literal["drop", "keep"] = "drop",
                 remove_images_without_annotations: bool = False, category_ids: list[int] | None = None,
                 max_images: int | None = None, progress: bool | None = None, *, cache: bool = True,
                 filter_rule: Literal["instances", "torchvision"] = "instances"):
        self.root, self.annotation_file = Path(images), Path(annotations)
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise ConfigError([Problem("images", f"folder '{display_path(self.root)}' {what}; set it to the folder holding the image files")])
        if crowd not in ("drop", "keep"):
            raise ConfigError([Problem("crowd", f"expected 'drop' or 'keep', got {crowd!r}")])
        if max_images is not None and max_images < 1:
            raise ConfigError([Problem("max_images", f"must be >= 1 or null, got {max_images}")])
        if filter_rule not in ("instances", "torchvision"):
            raise ConfigError([Problem("filter_rule", f"expected 'instances' or 'torchvision', got {filter_rule!r}")])
        if filter_rule != "instances" and not remove_images_without_annotations:
            raise ConfigError([Problem("filter_rule", "takes effect with remove_images_without_annotations: true; "
                                       "set that too, or remove filter_rule")])
        try:
            size = self.annotation_file.stat().st_size
        except OSError:
            size = 0  # read_coco_bytes reports it
        report = Progress(f"coco {self.annotation_file.name}", progress if progress is not None else size >= _PROGRESS_BYTES)
        parsed = load_or_parse(self.annotation_file, category_ids, lambda: self._parse(category_ids, report), report,
                               cache=cache)
        self.index, self._label, self.categories = parsed.index, parsed.label, parsed.categories
        self.crowd, self._cache = crowd, cache
        rows = np.arange(len(self.index))
        if remove_images_without_annotations:
            counted = self._trained() if filter_rule == "instances" else self._torchvision_counted()
            rows = rows[np.bincount(self.index.annotation_images()[counted], minlength=len(rows))[rows] > 0]
        if max_images is not None:
            rows = rows[:max_images]
        self._rows = rows
        if not len(rows):
            self._refuse_empty(remove_images_without_annotations, filter_rule, category_ids)
        report(f"indexed {len(rows):,} images, {self.index.num_annotations:,} annotations in {self.index.nbytes / 2**20:,.0f} MB")
        check_listed(self.index, rows, self.root, self.annotation_file)
        report(f"found the {len(rows):,} image files")
        self._coco = None

    def _refuse_empty(self, removed: bool, rule: str, category_ids: list[int] | None) -> None:
        file = display_path(self.annotation_file)
        if not len(self.index):
            raise ConfigError([Problem("annotations", "lists no images; a split needs at least one (check the file)", file)])
        why = (f"no image has a training instance ({'crowd: drop, ' if self.crowd == 'drop' else ''}boxes clipped to "
               "the image)" if rule == "instances" else "no image has a box over 1 px wide and high (filter_rule: torchvision)")
        selected = f" among category_ids {category_ids}" if category_ids is not None else ""
        raise ConfigError([Problem("remove_images_without_annotations" if removed else "category_ids",
                                   f"leaves none of the {len(self.index):,} images of {file}: {why}{selected}; "
                                   "check category_ids and the file, or set remove_images_without_annotations: false")])

    def _torchvision_counted(self) -> np.ndarray:
        """Annotation rows that keep an image under torchvision's ``_coco_remove_images_without_annotations``:
        any selected annotation (crowd too, even outside the image) whose box is over 1 px wide and high."""
        return (self.index.boxes[:, 2] > 1) & (self.index.boxes[:, 3] > 1)

    def check_images(self, progress: bool = True):
        """Read every image's header (``rcnn-lab validate --data --deep``; ``rcnn_lab.data.coco_files``)."""
        return check_headers(self.index, self._rows, self.root, self.annotation_file, progress=progress, cache=self._cache)

    def _parse(self, category_ids: list[int] | None, report: Progress) -> ParsedCoco:
        """Read and check the file (the cache's miss)."""
        file = display_path(self.annotation_file)
        raw = read_coco_bytes(self.annotation_file)
        report(f"read {len(raw) / 2**20:,.0f} MB")
        parsed = parse_fast(raw, file, category_ids, report)
        if parsed is None:  # something unusual: the plain path reports it (or accepts it) exactly
            parsed = parse_checked(parse_coco_json(raw, self.annotation_file), file, category_ids)
        return parsed

    def _trained(self) -> np.ndarray:
        """Which annotation rows become targets (see ``_train_annotations``), vectorised."""
        index = self.index
        x, y, w, h = index.boxes.T
        img = index.annotation_images()
        keep = (np.minimum(x + w, index.widths[img]) > np.maximum(x, 0)) & (np.minimum(y + h, index.heights[img]) > np.maximum(y, 0))
        return keep & ~index.crowd if self.crowd == "drop" else keep

    def _train_annotations(self, img: dict, anns: list[dict]) -> list[dict]:
        """Annotations that become targets: selected categories, non-degenerate boxes, crowd per ``crowd``."""
        out = []
        for ann in anns:
            if ann.get("iscrowd", 0) and self.crowd == "drop":
                continue
            x, y, w, h = ann["bbox"]
            if min(x + w, img["width"]) > max(x, 0) and min(y + h, img["height"]) > max(y, 0):
                out.append(ann)
        return out

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        row = int(self._rows[index])
        img = self.index.image(row)
        path = self.root / img["file_name"]
        try:
            image = read_image(path)
        except ImageError as exc:
            raise exc.under("images") from None
        h, w = img["height"], img["width"]
        if tuple(image.shape[1:]) != (h, w):
            raise ConfigError([Problem("images", f"'{display_path(path)}' is {image.shape[2]}x{image.shape[1]} (WxH) but "
                                       f"{display_path(self.annotation_file)} says {w}x{h}; fix width/height there", None)])
        anns = self._train_annotations(img, self.index.annotations(row))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        masks = np.zeros((len(anns), h, w), np.uint8)
        for k, ann in enumerate(anns):
            seg = ann.get("segmentation")
            if seg is None or seg == []:
                x0, y0, x1, y1 = boxes[k].round().int().tolist()
                masks[k, y0:y1, x0:x1] = 1
            else:
                masks[k] = decode_segmentation(seg, h, w)
        mask_t = torch.from_numpy(masks)
        area = [a["area"] if is_number(a.get("area")) else float(masks[k].sum()) for k, a in enumerate(anns)]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": mask_t,
            "image_id": int(img["id"]),
            "area": torch.tensor(area, dtype=torch.float32),
            "iscrowd": torch.tensor([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=torch.int64),
        }
        return image, target

    def aspect_ratios(self) -> list[float]:
        """Width / height per image, from the JSON."""
        rows = self._rows
        return (self.index.widths[rows] / self.index.heights[rows]).tolist()

    def to_coco_dict(self) -> dict:
        """Ground truth for the dataset's images and selected categories, crowd regions included.

        Missing ``id``, ``area`` (mask area) and ``iscrowd`` fields are filled in; an annotation
        without a segmentation gets its box as a polygon.
        """
        every = [self.index.annotations(row) for row in range(len(self.index))]
        images, annotations, next_id = [], [], 1 + max((a.get("id", 0) for v in every for a in v
                                                        if isinstance(a.get("id"), int)), default=0)
        for row in self._rows.tolist():
            img = self.index.image(row)
            images.append(img)
            for ann in every[row]:
                out = dict(ann)
                if not isinstance(out.get("id"), int):
                    out["id"], next_id = next_id, next_id + 1
                x, y, w, h = out["bbox"]
                if out.get("segmentation") in (None, []):
                    out["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                if not is_number(out.get("area")):
                    out["area"] = float(decode_segmentation(out["segmentation"], img["height"], img["width"]).sum())
                out["iscrowd"] = int(bool(out.get("iscrowd", 0)))
                annotations.append(out)
        return {"images": images, "annotations": annotations, "categories": [dict(c) for c in self.categories]}

    def coco(self):
        """Ground truth as an in-memory ``pycocotools.coco.COCO`` (built once; original ids)."""
        if self._coco is None:
            self._coco = coco_from_dict(self.to_coco_dict())
        return self._coco


@DATASETS.register("coco")
def coco(
    images: str,
    annotations: str,
    crowd: Literal["drop", "keep"] = "drop",
    remove_images_without_annotations: bool = False,
    category_ids: list[int] | None = None,
    max_images: int | None = None,
    filter_rule: Literal["instances", "torchvision"] = "instances",
) -> CocoDataset:
    """COCO-format data: an images folder and a JSON file (polygons or RLE masks).

    Args:
        images: folder the JSON's ``file_name`` entries are relative to.
        annotations: the COCO JSON file (images, annotations, categories).
        crowd: ``drop`` leaves ``iscrowd`` annotations out of training targets (evaluation still
            sees them); ``keep`` includes them with ``iscrowd = 1``.
        remove_images_without_annotations: skip images left with no target instance (after
            ``crowd`` and ``category_ids`` filtering). Images kept without instances give empty
            targets (boxes ``[0, 4]``, masks ``[0, H, W]``).
        category_ids: use only these category ids (labels follow their sorted order); null: all.
        max_images: the first N images by id (quick experiments); null: all.
        filter_rule: which images ``remove_images_without_annotations`` removes. ``instances``: those
            left without a training instance. ``torchvision``: the reference scripts' rule
            (``_coco_remove_images_without_annotations``): those without an annotation of a selected
            category, crowd regions and boxes outside the image included, or whose every box is at
            most 1 px wide or high; the images kept may then have empty targets.
    """
    return CocoDataset(images, annotations, crowd, remove_images_without_annotations,
                       list(category_ids) if category_ids is not None else None, max_images, filter_rule=filter_rule)
