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

The JSON is checked when the dataset is built (structure, ids, segmentations) and every listed
image file must exist, so mistakes fail before training starts. Problems name the JSON file,
the spec key (``annotations`` or ``images``, rooted at e.g. ``data.train`` by the registry) and
the entry at fault.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from rcnn_lab.errors import ConfigError, Problem, display_path
from rcnn_lab.registry import DATASETS

_MAX_PROBLEMS = 8


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
    """Decode an image file to uint8 ``[3, H, W]`` RGB.

    Uses ``torchvision.io.decode_image`` (its torchvision 0.29 deprecation warning silenced) and
    falls back to PIL, a torchvision dependency, where that decoder is unavailable.
    """
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # removed in a future torchvision
        decode_image = None
    if decode_image is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            return decode_image(str(path), mode=ImageReadMode.RGB)
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.array(image.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_segmentation(seg: Any, height: int, width: int) -> str | None:
    """Why ``seg`` cannot be decoded for a ``height x width`` image, or None."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, list):
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(_is_number, poly))):
                return "polygons must be lists of at least 3 x,y pairs of numbers"
        return None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [height, width]:
            return f"RLE size {list(seg['size'])} differs from the image's [height, width] [{height}, {width}]"
        if not isinstance(seg["counts"], (str, list)):
            return "RLE counts must be a string (compressed) or a list of run lengths"
        return None
    return "segmentation must be a list of polygons or an RLE {size, counts}"


class _Checker:
    """Collects problems in the JSON file, keeping the first few."""

    def __init__(self, file: str):
        self.file, self.problems, self.count = file, [], 0

    def add(self, message: str, key: str = "annotations") -> None:
        self.count += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(Problem(key, message, self.file))

    def raise_if_any(self) -> None:
        if self.count:
            extra = self.count - len(self.problems)
            if extra:
                self.problems.append(Problem("annotations", f"... and {extra} more problems", self.file))
            raise ConfigError(self.problems)

    def entries(self, data: dict, key: str, required: dict[str, tuple[type, ...]]) -> list[dict]:
        """Entries of ``data[key]`` having the ``required`` keys with the right types; others are problems."""
        good = []
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                self.add(f"{key}[{i}]: expected an object, got {type(entry).__name__}; fix the file")
                continue
            bad = [k for k, types in required.items() if not isinstance(entry.get(k), types) or isinstance(entry.get(k), bool)]
            if bad:
                what = ", ".join(f"'{k}'" + (" (missing)" if k not in entry else f" (got {entry[k]!r})") for k in bad)
                self.add(f"{key}[{i}]: needs {what}; fix the file")
                continue
            good.append(entry)
        return good


def load_coco_json(path: str | Path) -> dict:
    """Parse a COCO JSON file; problems name the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([Problem("annotations", f"file '{display_path(p)}' does not exist; set it to a COCO JSON file")])
    try:
        with p.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError([Problem("annotations", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
                                   "fix the file", display_path(p))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("annotations", f"cannot read the file ({exc}); check it is a COCO JSON file",
                                   display_path(p))]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("annotations", f"expected a JSON object with images, annotations and categories, "
                                   f"got {type(data).__name__}; fix the file", display_path(p))])
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ConfigError([Problem("annotations", f"missing top-level list(s) {', '.join(repr(k) for k in missing)}; a COCO "
                                   "file needs images, annotations and categories", display_path(p))])
    return data


class CocoDataset(Dataset):
    """Images folder + COCO JSON following the Dataset contract (see the module docstring)."""

    def __init__(self, images: str | Path, annotations: str | Path, crowd: Literal["drop", "keep"] = "drop",
                 remove_images_without_annotations: bool = False, category_ids: list[int] | None = None,
                 max_images: int | None = None):
        self.root, self.annotation_file = Path(images), Path(annotations)
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise ConfigError([Problem("images", f"folder '{display_path(self.root)}' {what}; set it to the folder holding the image files")])
        if crowd not in ("drop", "keep"):
            raise ConfigError([Problem("crowd", f"expected 'drop' or 'keep', got {crowd!r}")])
        if max_images is not None and max_images < 1:
            raise ConfigError([Problem("max_images", f"must be >= 1 or null, got {max_images}")])
        data = load_coco_json(self.annotation_file)
        file = display_path(self.annotation_file)
        check = _Checker(file)
        imgs = check.entries(data, "images", {"id": (int,), "file_name": (str,), "width": (int,), "height": (int,)})
        cats = check.entries(data, "categories", {"id": (int,), "name": (str,)})
        anns = check.entries(data, "annotations", {"image_id": (int,), "category_id": (int,), "bbox": (list,)})
        check.raise_if_any()

        by_id: dict[int, dict] = {}
        for i, img in enumerate(imgs):
            if img["id"] in by_id:
                check.add(f"images[{i}]: image id {img['id']} is used twice; ids must be unique")
            by_id[img["id"]] = img
        cat_ids = {c["id"] for c in cats}
        if len(cat_ids) != len(cats):
            check.add("categories: some category ids are used twice; ids must be unique")
        if category_ids is not None:
            unknown = sorted(set(category_ids) - cat_ids)
            if unknown or not category_ids:
                raise ConfigError([Problem("category_ids", f"{unknown or 'empty list'}: not categories of {file} "
                                           f"(ids there: {sorted(cat_ids)[:20]}); pick ids from the file or null for all")])
        selected = sorted(set(category_ids) if category_ids is not None else cat_ids)
        self._label = {cid: i + 1 for i, cid in enumerate(selected)}
        names = {c["id"]: c for c in cats}
        self.categories = [{"id": cid, "name": names[cid]["name"], **({"supercategory": names[cid]["supercategory"]}
                            if "supercategory" in names[cid] else {})} for cid in selected]

        per_image: dict[int, list[dict]] = {i: [] for i in by_id}
        for i, ann in enumerate(anns):
            img = by_id.get(ann["image_id"])
            if img is None:
                check.add(f"annotations[{i}]: image_id {ann['image_id']} is not in images; fix the id or remove the annotation")
            elif ann["category_id"] not in cat_ids:
                check.add(f"annotations[{i}]: category_id {ann['category_id']} is not in categories; fix the id or add the category")
            elif len(ann["bbox"]) != 4 or not all(map(_is_number, ann["bbox"])):
                check.add(f"annotations[{i}]: bbox must be 4 numbers [x, y, width, height], got {ann['bbox']!r}")
            elif (why := _check_segmentation(ann.get("segmentation"), img["height"], img["width"])) is not None:
                check.add(f"annotations[{i}]: {why}; fix the segmentation")
            elif ann["category_id"] in self._label:
                per_image[img["id"]].append(ann)
        for img in imgs:
            if img["width"] < 1 or img["height"] < 1:
                check.add(f"images: image id {img['id']} has width {img['width']} and height {img['height']}; both must be >= 1")
        check.raise_if_any()

        self.crowd = crowd
        self._images = [by_id[i] for i in sorted(by_id)]
        self._anns = per_image
        if remove_images_without_annotations:
            self._images = [img for img in self._images if self._train_annotations(img)]
        if max_images is not None:
            self._images = self._images[:max_images]
        self._check_files()
        self._coco = None

    def _check_files(self) -> None:
        """Fail fast when listed image files are missing (one directory listing per folder)."""
        listing: dict[Path, set[str]] = {}
        missing = []
        for img in self._images:
            path = self.root / img["file_name"]
            if path.parent not in listing:
                try:
                    listing[path.parent] = set(os.listdir(path.parent))
                except OSError:
                    listing[path.parent] = set()
            if path.name not in listing[path.parent]:
                missing.append(img["file_name"])
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ConfigError([Problem("images", f"{len(missing)} image file(s) listed in {display_path(self.annotation_file)} "
                                       f"are missing from '{display_path(self.root)}': {shown}; check the folder")])

    def _train_annotations(self, img: dict) -> list[dict]:
        """Annotations that become targets: selected categories, non-degenerate boxes, crowd per ``crowd``."""
        out = []
        for ann in self._anns[img["id"]]:
            if ann.get("iscrowd", 0) and self.crowd == "drop":
                continue
            x, y, w, h = ann["bbox"]
            if min(x + w, img["width"]) > max(x, 0) and min(y + h, img["height"]) > max(y, 0):
                out.append(ann)
        return out

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        img = self._images[index]
        path = self.root / img["file_name"]
        try:
            image = read_rgb(path)
        except (RuntimeError, OSError) as exc:
            raise ConfigError([Problem("images", f"cannot decode '{display_path(path)}' ({exc}); replace or remove the image")]) from None
        h, w = img["height"], img["width"]
        if tuple(image.shape[1:]) != (h, w):
            raise ConfigError([Problem("images", f"'{display_path(path)}' is {image.shape[2]}x{image.shape[1]} (WxH) but "
                                       f"{display_path(self.annotation_file)} says {w}x{h}; fix width/height there", None)])
        anns = self._train_annotations(img)
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
        area = [a["area"] if _is_number(a.get("area")) else float(masks[k].sum()) for k, a in enumerate(anns)]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": mask_t,
            "image_id": int(img["id"]),
            "area": torch.tensor(area, dtype=torch.float32),
            "iscrowd": torch.tensor([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=torch.int64),
        }
        return image.float().div_(255.0), target

    def aspect_ratios(self) -> list[float]:
        """Width / height per image, from the JSON."""
        return [img["width"] / img["height"] for img in self._images]

    def to_coco_dict(self) -> dict:
        """Ground truth for the dataset's images and selected categories, crowd regions included.

        Missing ``id``, ``area`` (mask area) and ``iscrowd`` fields are filled in; an annotation
        without a segmentation gets its box as a polygon.
        """
        images, annotations, next_id = [], [], 1 + max((a.get("id", 0) for v in self._anns.values() for a in v
                                                        if isinstance(a.get("id"), int)), default=0)
        for img in self._images:
            images.append({k: img[k] for k in ("id", "file_name", "width", "height")})
            for ann in self._anns[img["id"]]:
                out = dict(ann)
                if not isinstance(out.get("id"), int):
                    out["id"], next_id = next_id, next_id + 1
                x, y, w, h = out["bbox"]
                if out.get("segmentation") in (None, []):
                    out["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                if not _is_number(out.get("area")):
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
    """
    return CocoDataset(images, annotations, crowd, remove_images_without_annotations,
                       list(category_ids) if category_ids is not None else None, max_images)
