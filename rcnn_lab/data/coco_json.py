"""Reading and checking a COCO JSON file into a :class:`~rcnn_lab.data.coco_index.CocoIndex`.

Two paths give the same index. The fast one decodes the file with msgspec into typed records
(images, annotations' fields; the annotations' JSON kept verbatim) and checks it with numpy; it
makes every check of the plain one. Whenever it meets anything unusual (a type, a missing key,
an unknown id, a bad segmentation, NaN in the file) the plain path runs instead: ``json.loads``
and a check entry by entry, whose one-line problems name the file, the key and the entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from rcnn_lab.data.coco_index import CocoIndex, Progress
from rcnn_lab.errors import ConfigError, Problem, display_path

_MAX_PROBLEMS = 8
_CHUNK = 16384  # annotations decoded per msgspec call: bounds the transient memory of the fast path


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_segmentation(seg: Any, height: int, width: int) -> str | None:
    """Why ``seg`` cannot be decoded for a ``height x width`` image, or None."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, list):
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(is_number, poly))):
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


def read_coco_bytes(path: str | Path) -> bytes:
    """The bytes of a COCO JSON file; a missing or unreadable file is a problem naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([Problem("annotations", f"file '{display_path(p)}' does not exist; set it to a COCO JSON file")])
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem("annotations", f"cannot read the file ({exc}); check it is a COCO JSON file",
                                   display_path(p))]) from None


def parse_coco_json(raw: bytes, path: str | Path) -> dict:
    """``json.loads`` of a COCO file's bytes; problems name the file, line and column."""
    p = Path(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError([Problem("annotations", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
                                   "fix the file", display_path(p))]) from None
    except UnicodeDecodeError as exc:
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


def load_coco_json(path: str | Path) -> dict:
    """Parse a COCO JSON file into dicts; problems name the file, line and column."""
    return parse_coco_json(read_coco_bytes(path), path)


@dataclass(frozen=True)
class ParsedCoco:
    """A checked COCO file: selected categories (sorted ids), their labels ``1..C`` and the index."""

    categories: list[dict]
    label: dict[int, int]
    index: CocoIndex


def _select(cats: list[dict], category_ids: list[int] | None, file: str) -> tuple[list[dict], dict[int, int]]:
    cat_ids = {c["id"] for c in cats}
    if category_ids is not None:
        unknown = sorted(set(category_ids) - cat_ids)
        if unknown or not category_ids:
            raise ConfigError([Problem("category_ids", f"{unknown or 'empty list'}: not categories of {file} "
                                       f"(ids there: {sorted(cat_ids)[:20]}); pick ids from the file or null for all")])
    selected = sorted(set(category_ids) if category_ids is not None else cat_ids)
    names = {c["id"]: c for c in cats}
    categories = [{"id": cid, "name": names[cid]["name"], **({"supercategory": names[cid]["supercategory"]}
                   if "supercategory" in names[cid] else {})} for cid in selected]
    return categories, {cid: i + 1 for i, cid in enumerate(selected)}


def parse_checked(data: dict, file: str, category_ids: list[int] | None) -> ParsedCoco:
    """The plain path: check ``data`` (``json.loads`` of the file) entry by entry and index it."""
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
    categories, label = _select(cats, category_ids, file)

    per_image: dict[int, list[dict]] = {i: [] for i in by_id}
    for i, ann in enumerate(anns):
        img = by_id.get(ann["image_id"])
        if img is None:
            check.add(f"annotations[{i}]: image_id {ann['image_id']} is not in images; fix the id or remove the annotation")
        elif ann["category_id"] not in cat_ids:
            check.add(f"annotations[{i}]: category_id {ann['category_id']} is not in categories; fix the id or add the category")
        elif len(ann["bbox"]) != 4 or not all(map(is_number, ann["bbox"])):
            check.add(f"annotations[{i}]: bbox must be 4 numbers [x, y, width, height], got {ann['bbox']!r}")
        elif (why := check_segmentation(ann.get("segmentation"), img["height"], img["width"])) is not None:
            check.add(f"annotations[{i}]: {why}; fix the segmentation")
        elif ann["category_id"] in label:
            per_image[img["id"]].append(ann)
    for img in imgs:
        if img["width"] < 1 or img["height"] < 1:
            check.add(f"images: image id {img['id']} has width {img['width']} and height {img['height']}; both must be >= 1")
    check.raise_if_any()
    images = [by_id[i] for i in sorted(by_id)]
    return ParsedCoco(categories, label, CocoIndex.from_dicts(images, per_image))


class _Image(msgspec.Struct):
    id: int
    file_name: str
    width: int
    height: int


class _RLE(msgspec.Struct):
    size: list[Any]
    counts: str | list[Any]


class _Annotation(msgspec.Struct):
    image_id: int
    category_id: int
    bbox: list[float]
    segmentation: msgspec.Raw = msgspec.Raw(b"null")  # checked from its JSON text (see _polygons_ok), not decoded
    iscrowd: Any = 0


class _File(msgspec.Struct):
    images: list[_Image]
    annotations: list[msgspec.Raw]
    categories: list[Any]


_FILE = msgspec.json.Decoder(_File)
_ANNOTATIONS = msgspec.json.Decoder(list[_Annotation])
_RLE_DECODE = msgspec.json.Decoder(_RLE).decode
_SPACE = b" \t\n\r"
_POLYGON_CHARS = b"[],0123456789.-+eE" + _SPACE  # all a list of polygons may hold


def _polygons_ok(texts: list[bytes]) -> bool:
    """True when every JSON text (valid JSON, as msgspec checked) is a list of polygons that
    ``check_segmentation`` accepts: lists of numbers, each of even length >= 6. Vectorised: no
    number is decoded; brackets give the depth, numbers after a bracket or comma at depth 2
    the polygon lengths."""
    if not texts:
        return True
    joined = b"".join(texts)
    if joined.translate(None, _POLYGON_CHARS):
        return False  # strings, objects, true/false/null somewhere
    if any(space in joined for space in _SPACE):
        joined = joined.translate(None, _SPACE)
    c = np.frombuffer(joined, np.uint8)
    opens, closes = c == ord("["), c == ord("]")
    structural = opens | closes | (c == ord(","))
    at = np.flatnonzero(structural)  # valid JSON: every number follows a bracket or a comma
    then_number = ~structural[np.minimum(at + 1, len(c) - 1)]
    then_number[-1] = False
    depth = np.cumsum(opens[at].view(np.int8) - closes[at].view(np.int8), dtype=np.int32)
    if depth.max() > 2 or (depth[then_number] != 2).any():
        return False  # deeper nesting, or numbers outside a polygon
    starts = opens[at] & (depth == 2)
    polygon = np.cumsum(starts, dtype=np.int32) - 1
    length = np.bincount(polygon[then_number], minlength=int(starts.sum()))
    return not ((length < 6) | (length % 2 == 1)).any()


class _Unusual(Exception):
    """The fast path met something only the plain path reports (or accepts) exactly."""


def parse_fast(raw: bytes, file: str, category_ids: list[int] | None, progress: Progress) -> ParsedCoco | None:
    """The fast path; None when the file needs the plain path (see the module docstring)."""
    try:
        top = _FILE.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    progress(f"parsed {len(top.images):,} images, {len(top.annotations):,} annotations, {len(top.categories):,} categories")
    try:
        return _index_fast(top, file, category_ids, progress)
    except (_Unusual, OverflowError, ValueError, TypeError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _index_fast(top: _File, file: str, category_ids: list[int] | None, progress: Progress) -> ParsedCoco:
    check = _Checker(file)
    cats = check.entries({"categories": top.categories}, "categories", {"id": (int,), "name": (str,)})
    images = top.images
    n, m = len(images), len(top.annotations)
    ids = np.fromiter((im.id for im in images), np.int64, n)
    widths = np.fromiter((im.width for im in images), np.int64, n)
    heights = np.fromiter((im.height for im in images), np.int64, n)
    sorted_ids = np.sort(ids)
    cat_ids = {c["id"] for c in cats}
    if check.count or len(cat_ids) != len(cats) or (n > 1 and (np.diff(sorted_ids) == 0).any()) \
            or (widths < 1).any() or (heights < 1).any():
        raise _Unusual

    ann_image = np.empty(m, np.int64)
    ann_cat = np.empty(m, np.int64)
    boxes = np.empty((m, 4), np.float64)
    crowd = np.empty(m, bool)
    rle: list[tuple[int, list]] = []
    raws = top.annotations
    for start in range(0, m, _CHUNK):
        anns = _ANNOTATIONS.decode(b"[" + b",".join(raws[start:start + _CHUNK]) + b"]")
        k = len(anns)
        ann_image[start:start + k] = np.fromiter((a.image_id for a in anns), np.int64, k)
        ann_cat[start:start + k] = np.fromiter((a.category_id for a in anns), np.int64, k)
        crowd[start:start + k] = np.fromiter((bool(a.iscrowd) for a in anns), bool, k)
        bbox = [a.bbox for a in anns]
        if any(len(b) != 4 for b in bbox):
            raise _Unusual
        boxes[start:start + k] = bbox
        polygons = []
        for j, a in enumerate(anns):
            seg = a.segmentation
            first = memoryview(seg)[0]
            if first == 91:  # "[": polygons
                polygons.append(seg)
            elif first == 123:  # "{": RLE
                rle.append((start + j, _RLE_DECODE(seg).size))
            elif bytes(seg) != b"null":
                raise _Unusual
        if not _polygons_ok(polygons):
            raise _Unusual
        del anns, bbox, polygons
    position = np.searchsorted(sorted_ids, ann_image)
    if m and ((position >= n).any() or (sorted_ids[np.minimum(position, n - 1)] != ann_image).any()):
        raise _Unusual  # an image_id that is not in images
    if m and not np.isin(ann_cat, np.fromiter(cat_ids, np.int64, len(cat_ids))).all():
        raise _Unusual  # a category_id that is not in categories
    by_id = np.argsort(ids, kind="stable")
    ann_image = by_id[position]  # position of each annotation's image in file order
    for k, size in rle:
        if list(size) != [int(heights[ann_image[k]]), int(widths[ann_image[k]])]:
            raise _Unusual
    progress(f"checked {n:,} images, {m:,} annotations")

    categories, label = _select(cats, category_ids, file)
    keep = np.isin(ann_cat, np.fromiter(label, np.int64, len(label)))
    kept = np.flatnonzero(keep).tolist()
    selected = raws if len(kept) == m else [raws[k] for k in kept]
    index = CocoIndex.build(ids, widths, heights, [im.file_name for im in images], ann_image[keep], selected,
                            boxes[keep], crowd[keep])
    return ParsedCoco(categories, label, index)
