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

from rcnn_lab.data.coco_checks import (
    MAX_COORD,
    MAX_OUTLINE,
    MAX_PIXELS,
    area_problem,
    bbox_problem,
    deepest,
    id_problem,
    image_size_problem,
    is_int,
    is_number,
    locate,
    name_problem,
    parse_int,
    polygons_fit,
    rle_problem,
    segmentation_problem,
)
from rcnn_lab.data.coco_index import CocoIndex, Progress
from rcnn_lab.errors import ConfigError, Problem, display_path, excerpt

_MAX_PROBLEMS = 8
_CHUNK = 16384  # annotations decoded per msgspec call: bounds the transient memory of the fast path
_MAX_NESTING = 32  # what Python's JSON parsers may meet (a COCO file nests 5 levels; theirs recurse)
_NUMBERS = bytes.maketrans(b"[],", b"   ")


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

    def entries(self, data: dict, key: str, required: dict[str, tuple[type, ...]]) -> list[tuple[int, dict]]:
        """``(position, entry)`` of the entries of ``data[key]`` having the ``required`` keys with the right
        types and ids (``id``, ``*_id``) that fit in int64; others are problems."""
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
            ids = [k for k in required if k == "id" or k.endswith("_id")] + (["id"] if entry.get("id") is not None and "id" not in required else [])
            bad = next(((k, entry[k]) for k in ids if not is_int(entry[k]) or id_problem(entry[k])), None)
            if bad is not None:
                self.add(f"{key}[{i}].{bad[0]}: " + (id_problem(bad[1]) if is_int(bad[1]) else
                                                     f"must be an integer, got {excerpt(bad[1])}; fix the file"))
                continue
            good.append((i, entry))
        return good


def read_coco_bytes(path: str | Path) -> bytes:
    """The bytes of a COCO JSON file; a missing or unreadable file is a problem naming it."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist" if not p.exists() else "is not a regular file"
        raise ConfigError([Problem("annotations", f"'{display_path(p)}' {what}; set it to a COCO JSON file")])
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem("annotations", f"cannot read the file ({exc}); check it is a COCO JSON file",
                                   display_path(p))]) from None


def parse_coco_json(raw: bytes, path: str | Path) -> dict:
    """``json.loads`` of a COCO file's bytes; problems name the file, line and column."""
    p = Path(path)
    try:
        data = json.loads(raw, parse_int=parse_int)
    except RecursionError:
        raise nesting_error(raw, display_path(p)) from None
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


def nesting_error(raw: bytes, file: str) -> ConfigError:
    """The problem of a file nesting too deep for the JSON parsers, naming the entry."""
    at = deepest(raw, _MAX_NESTING)
    where = locate(raw, at) if at is not None else "the file"
    return ConfigError([Problem("annotations", f"{where}: nests deeper than {_MAX_NESTING} levels (a COCO file needs 5); "
                                "fix the file", file)])


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
    for i, img in imgs:
        if img["id"] in by_id:
            check.add(f"images[{i}]: image id {img['id']} is used twice; ids must be unique")
        elif (why := name_problem(img["file_name"])) is not None:
            check.add(f"images[{i}].file_name: {why}")
        elif (why := image_size_problem(img["width"], img["height"])) is not None:
            check.add(f"images[{i}]: {why}")
        by_id[img["id"]] = img
    cat_ids = {c["id"] for _, c in cats}
    if len(cat_ids) != len(cats):
        check.add("categories: some category ids are used twice; ids must be unique")
    check.raise_if_any()  # the annotations' checks need sound images
    categories, label = _select([c for _, c in cats], category_ids, file)

    per_image: dict[int, list[dict]] = {i: [] for i in by_id}
    ann_ids: dict[int, int] = {}
    for i, ann in anns:
        img = by_id.get(ann["image_id"])
        if img is None:
            check.add(f"annotations[{i}]: image_id {ann['image_id']} is not in images; fix the id or remove the annotation")
        elif ann["category_id"] not in cat_ids:
            check.add(f"annotations[{i}]: category_id {ann['category_id']} is not in categories; fix the id or add the category")
        elif ann.get("id") is not None and ann["id"] in ann_ids:
            check.add(f"annotations[{i}].id: {ann['id']} is also the id of annotations[{ann_ids[ann['id']]}]; "
                      "fix the file so that annotation ids are unique")
        elif len(ann["bbox"]) != 4 or not all(map(is_number, ann["bbox"])):
            check.add(f"annotations[{i}].bbox: must be 4 numbers [x, y, width, height], got {excerpt(ann['bbox'])}; fix the file")
        elif (found := bbox_problem(ann["bbox"])) is not None:
            check.add(f"annotations[{i}].bbox{found[0]}: {found[1]}; fix or remove the annotation")
        elif (found := segmentation_problem(ann.get("segmentation"), img["height"], img["width"])) is not None:
            check.add(f"annotations[{i}].segmentation{found[0]}: {found[1]}; fix the segmentation")
        elif (why := area_problem(ann.get("area"))) is not None:
            check.add(f"annotations[{i}].area: {why}")
        elif ann["category_id"] in label:
            per_image[img["id"]].append(ann)
        if ann.get("id") is not None:
            ann_ids.setdefault(ann["id"], i)
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
    id: Any = None
    area: Any = None


class _File(msgspec.Struct):
    images: list[_Image]
    annotations: list[msgspec.Raw]
    categories: list[Any]


_FILE = msgspec.json.Decoder(_File)
_ANNOTATIONS = msgspec.json.Decoder(list[_Annotation])
_RLE_DECODE = msgspec.json.Decoder(_RLE).decode
_SPACE = b" \t\n\r"
_POLYGON_CHARS = b"[],0123456789.-+eE" + _SPACE  # all a list of polygons may hold


def _polygon_scan(texts: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(characters, polygon starts, lengths)`` when every JSON text (valid JSON, as msgspec checked) is a
    list of polygons that ``check_segmentation`` accepts (lists of numbers, each of even length >= 6);
    else None. ``characters``: the texts joined, whitespace removed; ``starts``: where each polygon's
    ``[`` is; ``lengths``: its count of numbers. Vectorised: no number is decoded; brackets give the
    depth, numbers after a bracket or comma at depth 2 the polygon lengths."""
    joined = b"".join(texts)
    if joined.translate(None, _POLYGON_CHARS):
        return None  # strings, objects, true/false/null somewhere
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
        return None  # deeper nesting, or numbers outside a polygon
    starts = opens[at] & (depth == 2)
    polygon = np.cumsum(starts, dtype=np.int32) - 1
    length = np.bincount(polygon[then_number], minlength=int(starts.sum()))
    return None if ((length < 6) | (length % 2 == 1)).any() else (c, at[starts], length)


def _polygon_lengths(texts: list[bytes]) -> np.ndarray | None:
    """Each polygon's count of numbers (see ``_polygon_scan``), or None."""
    scan = _polygon_scan(texts) if texts else (None, None, np.zeros(0, np.int64))
    return None if scan is None else scan[2]


def _polygons_ok(texts: list[bytes]) -> bool:
    """``_polygon_scan`` accepts the texts and their coordinates are within the limits (``polygons_fit``).

    Cheap for real files: a polygon whose integer parts have ``d`` digits at most (no exponent) has
    coordinates below ``10**d`` and an outline of at most ``n / 2 * (10 * 10**d + 1)`` points, so only
    polygons that this bound does not clear (rare; or any exponent) have their numbers decoded."""
    if not texts:
        return True
    scan = _polygon_scan(texts)
    if scan is None:
        return False
    c, starts, lengths = scan
    digit = (c >= 48) & (c <= 57)
    first = np.flatnonzero(digit & ~np.r_[False, digit[:-1]])  # each run of digits
    last = np.flatnonzero(digit & ~np.r_[digit[1:], False])
    whole = c[np.maximum(first - 1, 0)] != ord(".")  # an integer part (not a fraction's digits)
    digits = np.zeros(len(lengths), np.int64)
    np.maximum.at(digits, np.searchsorted(starts, first[whole], side="right") - 1, (last - first + 1)[whole])
    bound = lengths / 2 * (10.0 * 10.0 ** np.minimum(digits, 300) + 1)
    if not (c == ord("e")).any() and not (c == ord("E")).any() and (digits <= 6).all() and (bound <= MAX_OUTLINE).all():
        return True
    numbers = np.fromstring(c.tobytes().translate(_NUMBERS), dtype=np.float64, sep=" ")
    return len(numbers) == int(lengths.sum()) and polygons_fit(numbers, lengths)


class _Unusual(Exception):
    """The fast path met something only the plain path reports (or accepts) exactly."""


def _finite_non_negative(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all() and (values >= 0).all())


def parse_fast(raw: bytes, file: str, category_ids: list[int] | None, progress: Progress) -> ParsedCoco | None:
    """The fast path; None when the file needs the plain path (see the module docstring)."""
    try:
        top = _FILE.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    except RecursionError:
        raise nesting_error(raw, file) from None
    progress(f"parsed {len(top.images):,} images, {len(top.annotations):,} annotations, {len(top.categories):,} categories")
    try:
        return _index_fast(top, file, category_ids, progress)
    except (_Unusual, OverflowError, ValueError, TypeError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _index_fast(top: _File, file: str, category_ids: list[int] | None, progress: Progress) -> ParsedCoco:
    check = _Checker(file)
    cats = [c for _, c in check.entries({"categories": top.categories}, "categories", {"id": (int,), "name": (str,)})]
    images = top.images
    n, m = len(images), len(top.annotations)
    ids = np.fromiter((im.id for im in images), np.int64, n)
    widths = np.fromiter((im.width for im in images), np.int64, n)
    heights = np.fromiter((im.height for im in images), np.int64, n)
    sorted_ids = np.sort(ids)
    cat_ids = {c["id"] for c in cats}
    if check.count or len(cat_ids) != len(cats) or (n > 1 and (np.diff(sorted_ids) == 0).any()) \
            or (widths < 1).any() or (heights < 1).any() or (widths > MAX_PIXELS).any() or (heights > MAX_PIXELS).any() \
            or (widths * heights > MAX_PIXELS).any() or any(name_problem(im.file_name) for im in images):
        raise _Unusual

    ann_image = np.empty(m, np.int64)
    ann_cat = np.empty(m, np.int64)
    boxes = np.empty((m, 4), np.float64)
    crowd = np.empty(m, bool)
    ann_ids: list[int] = []
    rle: list[tuple[int, Any]] = []
    raws = top.annotations
    for start in range(0, m, _CHUNK):
        anns = _ANNOTATIONS.decode(b"[" + b",".join(raws[start:start + _CHUNK]) + b"]")
        k = len(anns)
        ann_image[start:start + k] = np.fromiter((a.image_id for a in anns), np.int64, k)
        ann_cat[start:start + k] = np.fromiter((a.category_id for a in anns), np.int64, k)
        crowd[start:start + k] = np.fromiter((bool(a.iscrowd) for a in anns), bool, k)
        ann_ids += [a.id for a in anns if a.id is not None]
        bbox = [a.bbox for a in anns]
        if any(len(b) != 4 for b in bbox):
            raise _Unusual
        areas = [a.area for a in anns if a.area is not None]
        if any(type(v) not in (int, float) for v in areas) or not _finite_non_negative(np.array(areas, np.float64)):
            raise _Unusual  # an area that is not a number, NaN, infinite or negative: the plain path names it
        boxes[start:start + k] = bbox
        polygons = []
        for j, a in enumerate(anns):
            seg = a.segmentation
            first = memoryview(seg)[0]
            if first == 91:  # "[": polygons
                polygons.append(seg)
            elif first == 123:  # "{": RLE
                rle.append((start + j, _RLE_DECODE(seg)))
            elif bytes(seg) != b"null":
                raise _Unusual
        if not _polygons_ok(polygons):
            raise _Unusual
        del anns, bbox, polygons
    if m and not ((np.abs(boxes) <= MAX_COORD).all() and (boxes[:, 2:] >= 0).all()):
        raise _Unusual  # NaN, infinite, out-of-range values or a negative size
    if not all(type(i) is int for i in ann_ids) or len(np.unique(np.fromiter(ann_ids, np.int64, len(ann_ids)))) != len(ann_ids):
        raise _Unusual  # an annotation id that is not an int64 or is used twice
    position = np.searchsorted(sorted_ids, ann_image)
    if m and ((position >= n).any() or (sorted_ids[np.minimum(position, n - 1)] != ann_image).any()):
        raise _Unusual  # an image_id that is not in images
    if m and not np.isin(ann_cat, np.fromiter(cat_ids, np.int64, len(cat_ids))).all():
        raise _Unusual  # a category_id that is not in categories
    by_id = np.argsort(ids, kind="stable")
    ann_image = by_id[position]  # position of each annotation's image in file order
    for k, seg in rle:
        if rle_problem({"size": seg.size, "counts": seg.counts}, int(heights[ann_image[k]]), int(widths[ann_image[k]])):
            raise _Unusual
    progress(f"checked {n:,} images, {m:,} annotations")

    categories, label = _select(cats, category_ids, file)
    keep = np.isin(ann_cat, np.fromiter(label, np.int64, len(label)))
    kept = np.flatnonzero(keep).tolist()
    selected = raws if len(kept) == m else [raws[k] for k in kept]
    index = CocoIndex.build(ids, widths, heights, [im.file_name for im in images], ann_image[keep], selected,
                            boxes[keep], crowd[keep])
    return ParsedCoco(categories, label, index)
