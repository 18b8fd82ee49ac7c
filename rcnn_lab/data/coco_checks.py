"""What a COCO file may declare, checked before any native code (pycocotools) sees it.

pycocotools trusts its input: a NaN polygon coordinate is cast to an int and sizes a ``malloc``, an
RLE whose runs add up to more than the image writes past its buffer. So every value that reaches
it is held to the limits below (docs/reliability.md lists them and what happens at each):

* ids (images, annotations, categories, and the ids annotations refer to) fit in int64;
* an image's ``width`` and ``height`` are >= 1 and ``width x height`` is at most
  ``rcnn_lab.data.images.MAX_PIXELS`` (the limit its pixels are opened with);
* every ``bbox`` value and polygon coordinate is a finite number within ``MAX_COORD`` of 0, box
  sizes are >= 0;
* a polygon's outline is at most ``MAX_OUTLINE`` points as pycocotools draws it (5 per pixel along
  the longer axis of each edge, see ``rleFrPoly``): that is its decoding memory;
* an RLE's ``counts`` decode (compressed: COCO's 6-bit characters; uncompressed: integers >= 0) to
  runs that cover exactly ``height x width`` pixels;
* nesting deeper than Python's parsers allow is located (``locate``) and named.

Each rule has a scalar form (``polygon_problem``, ``bbox_problem``, ``rle_problem``: the entry-by-entry
check) and, where the fast path needs one, a vectorised form (``polygons_fit``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from rcnn_lab.data.images import MAX_PIXELS
from rcnn_lab.errors import excerpt

MIN_ID, MAX_ID = -(2**63), 2**63 - 1  # ids are int64 (numpy index, torch image_id)
MAX_COORD = 1_000_000.0  # |bbox value|, |polygon coordinate|: 5x it still fits pycocotools' int32
MAX_OUTLINE = 2**24  # points pycocotools draws along one polygon (16 bytes each while decoding: 256 MB)
_SCALE = 5  # rleFrPoly's upsampling of the outline
_RLE_CHARS = 6  # characters of one compressed RLE number: 30 bits, more than any image of MAX_PIXELS needs

class Huge(int):
    """An integer literal too long for Python's ``int()`` (over 4,300 digits) or for int64: kept as its digit count."""

    def __new__(cls, digits: int, negative: bool = False):
        self = super().__new__(cls, MIN_ID - 1 if negative else MAX_ID + 1)
        self.digits = digits
        return self

    def __repr__(self) -> str:
        return f"a {self.digits:,}-digit integer"


def parse_int(text: str) -> int:
    """``json.loads``' ``parse_int``: integers of over 4,000 digits become ``Huge`` (no 4,300-digit ValueError)."""
    digits = len(text) - (text[0] == "-")
    return int(text) if digits <= 4000 else Huge(digits, text[0] == "-")


def id_problem(value: int) -> str | None:
    if not MIN_ID <= value <= MAX_ID:
        return f"{excerpt(value)} does not fit in 64 bits; use ids between {MIN_ID:,} and {MAX_ID:,}"
    return None


def image_size_problem(width: int, height: int) -> str | None:
    if width < 1 or height < 1:
        return f"width {width!r} and height {height!r}: both must be >= 1"
    if width * height > MAX_PIXELS:
        return (f"width x height is {width:,} x {height:,} = {width * height:,} pixels, over the limit of {MAX_PIXELS:,}; "
                "check the sizes (or downscale the image)")
    return None


def _finite_problem(value) -> str | None:
    if not math.isfinite(value):
        return f"is {value!r}; coordinates must be finite numbers"
    if abs(value) > MAX_COORD:
        return f"is {excerpt(value)}, beyond +-{MAX_COORD:,.0f}; coordinates must be finite numbers within that"
    return None


def bbox_problem(bbox: list) -> tuple[str, str] | None:
    """``(suffix, why)`` for a bbox of 4 numbers that is not finite, in range and of non-negative size."""
    for k, value in enumerate(bbox):
        why = _finite_problem(value)
        if why is not None:
            return f"[{k}]", why
    if bbox[2] < 0 or bbox[3] < 0:
        return "", f"{excerpt(bbox)} has a negative width or height; a bbox is [x, y, width >= 0, height >= 0]"
    return None


def outline_points(xy: np.ndarray, polygon: np.ndarray, count: int) -> np.ndarray:
    """Points pycocotools' ``rleFrPoly`` draws for each of ``count`` polygons (float64, ``xy``: [k, 2]
    vertices in order, ``polygon``: each vertex's polygon, non-decreasing)."""
    if not len(xy):
        return np.zeros(count)
    scaled = np.floor(xy * _SCALE + 0.5)
    first = np.r_[0, np.flatnonzero(np.diff(polygon)) + 1]  # each polygon's first vertex
    following = np.arange(1, len(xy) + 1)
    last = np.r_[first[1:], len(xy)] - 1
    following[last] = first  # the closing edge
    step = np.abs(scaled[following] - scaled).max(axis=1) + 1
    return np.bincount(polygon, weights=step, minlength=count)


def polygon_problem(poly: list) -> tuple[str, str] | None:
    """``(suffix, why)`` for a polygon (a list of >= 6 numbers, even length: checked before) out of the limits."""
    for k, value in enumerate(poly):
        why = _finite_problem(value)
        if why is not None:
            return f"[{k}]", why
    points = outline_points(np.asarray(poly, np.float64).reshape(-1, 2), np.zeros(len(poly) // 2, np.int64), 1)[0]
    if points > MAX_OUTLINE:
        return "", (f"outline of {points:,.0f} points as pycocotools draws it, over the limit of {MAX_OUTLINE:,}; "
                    "check its coordinates (a polygon far larger than its image)")
    return None


def polygons_fit(numbers: np.ndarray, lengths: np.ndarray) -> bool:
    """Vectorised ``polygon_problem`` over many polygons: ``numbers`` their coordinates one after another,
    ``lengths`` each polygon's count (even). True when every one is within the limits."""
    if not len(numbers):
        return True
    if not (np.abs(numbers) <= MAX_COORD).all():  # NaN compares False
        return False
    polygon = np.repeat(np.arange(len(lengths)), lengths // 2)
    return bool((outline_points(numbers.reshape(-1, 2), polygon, len(lengths)) <= MAX_OUTLINE).all())


def _compressed_counts(counts: str) -> np.ndarray | str:
    """The runs of a compressed RLE string (pycocotools' ``rleFrString``), or why it does not decode."""
    try:
        raw = counts.encode("ascii")
    except UnicodeEncodeError:
        return "counts holds characters that are not ASCII"
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if not len(c):
        return "counts is empty"
    if (c < 0).any() or (c > 63).any():
        return "counts holds characters outside COCO's RLE alphabet (ASCII 48-111)"
    more = (c & 0x20) != 0
    if more[-1]:
        return "counts ends inside a number (truncated?)"
    ends = np.flatnonzero(~more)
    starts = np.r_[0, ends[:-1] + 1]
    lengths = ends - starts + 1
    if lengths.max() > _RLE_CHARS:
        return f"counts holds a number of more than {_RLE_CHARS} characters"
    k = np.arange(len(c)) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x = np.where((c[ends] & 0x10) != 0, x - (1 << (5 * lengths)), x)  # sign extension of the last character
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])  # for m > 2, cnts[m] = x + cnts[m - 2]: the odd runs from run 1,
    runs[2::2] = np.cumsum(x[2::2])  # the even ones from run 2
    return runs


def rle_problem(seg: dict, height: int, width: int) -> str | None:
    """Why the RLE ``{size, counts}`` does not decode to a ``height x width`` mask, or None."""
    size, counts = seg["size"], seg["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
        return f"RLE size must be [height, width], got {excerpt(size)}"
    if size != [height, width]:
        return f"RLE size {excerpt(size)} differs from the image's [height, width] [{height}, {width}]"
    pixels = height * width
    if isinstance(counts, str):
        if len(counts) > _RLE_CHARS * (pixels + 1):
            return f"RLE counts is {len(counts):,} characters, more than a {height}x{width} mask can need"
        runs = _compressed_counts(counts)
        if isinstance(runs, str):
            return f"RLE {runs}"
    elif isinstance(counts, list):
        if len(counts) > pixels + 1:
            return f"RLE counts has {len(counts):,} runs, more than a {height}x{width} mask can hold"
        if not all(type(v) is int for v in counts):
            return "RLE counts must be a list of integers (uncompressed) or a string (compressed)"
        runs = np.asarray(counts, dtype=object)
    else:
        return "RLE counts must be a string (compressed) or a list of run lengths"
    if len(runs) and min(runs) < 0:
        return "RLE counts decode to a negative run length"
    total = int(sum(int(v) for v in runs)) if runs.dtype == object else int(runs.sum())
    if total != pixels:
        return f"RLE runs cover {total:,} pixels, the image has {height}x{width} = {pixels:,}"
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def area_problem(area: Any) -> str | None:
    """Why an annotation's ``area`` (optional: without one the mask's area is used) is unusable, or None.
    COCOeval sorts ground truth into its small / medium / large ranges by it: NaN would fall in all three."""
    fix = "an area is a finite number >= 0, or leave it out (the mask's area is then used)"
    if area is None:
        return None
    try:
        value = float(area) if is_number(area) else math.nan
    except OverflowError:  # an integer beyond float's range
        value = math.inf
    if not math.isfinite(value) or value < 0:
        return f"is {excerpt(area)}; {fix}"
    return None


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


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def segmentation_problem(seg: Any, height: int, width: int) -> tuple[str, str] | None:
    """``(suffix, why)`` when ``seg`` cannot be decoded or is out of the limits (``coco_checks``), or None."""
    why = check_segmentation(seg, height, width)
    if why is not None:
        return "", why
    if isinstance(seg, dict):
        why = rle_problem(seg, height, width)
        return None if why is None else ("", why)
    for k, poly in enumerate(seg or ()):
        found = polygon_problem(poly)
        if found is not None:
            return f"[{k}]{found[0]}", found[1]
    return None


def name_problem(name: str) -> str | None:
    """Why an image's ``file_name`` cannot name a file inside the images folder, or None."""
    if not name.strip():
        return "is empty; give the image's path relative to the images folder"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"{excerpt(name)} is an absolute path; give it relative to the images folder"
    if "\0" in name:
        return f"{excerpt(name)} holds a NUL character; fix the name"
    if name.endswith(("/", "\\")):
        return f"{excerpt(name)} names a folder; name the image file in it"
    return None


# --- naming the entry at a byte position (error paths only) --------------------------------------

_SCAN = 1 << 24  # bytes scanned at a time
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_KEY_BEFORE = re.compile(rb'"((?:[^"\\]|\\.){0,200})"\s*:\s*-?$')


def _brackets(c: np.ndarray, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (< ``end``) and steps (+1 open, -1 close) of the brackets outside JSON strings."""
    positions, steps, inside = [], [], 0
    for start in range(0, end, _SCAN):
        chunk = c[start:min(start + _SCAN, end)]
        quotes = np.flatnonzero(chunk == 34) + start
        escaped = [q for q in quotes[(quotes > 0) & (c[np.maximum(quotes - 1, 0)] == 92)].tolist()
                   if (q - 1 - next(i for i in range(q - 1, -2, -1) if i < 0 or c[i] != 92)) % 2]
        if escaped:
            quotes = np.setdiff1d(quotes, escaped)
        at = np.flatnonzero(_STEP[chunk]) + start
        outside = (np.searchsorted(quotes, at) + inside) % 2 == 0
        positions.append(at[outside])
        steps.append(_STEP[c[at[outside]]])
        inside = (inside + len(quotes)) % 2
    return np.concatenate(positions), np.concatenate(steps)


def _key_before(raw: bytes, pos: int) -> str | None:
    match = _KEY_BEFORE.search(raw[max(0, pos - 256):pos])
    return match.group(1).decode("utf-8", "replace") if match else None


def locate(raw: bytes, pos: int, levels: int = 4) -> str:
    """The entry holding byte ``pos`` of a JSON text, as ``annotations[12].segmentation`` (its first ``levels`` levels)."""
    c = np.frombuffer(raw, np.uint8)
    at, step = _brackets(c, pos)
    depth = np.cumsum(step, dtype=np.int64)
    path, previous, found = "", -1, 0
    for level in range(1, levels + 1):
        openers = np.flatnonzero((step == 1) & (depth == level))
        openers = openers[openers > previous]
        if not len(openers) or (depth[openers[-1]:] < level).any():
            break  # pos is not inside a container of this level
        here = openers[-1]
        if level > 1:
            key = _key_before(raw, int(at[here]))
            path += (f".{key}" if path else key) if key is not None else f"[{len(openers) - 1}]"
        previous, found = here, level
    key = _key_before(raw, pos)
    if key is not None and (int(depth[-1]) if len(depth) else 0) == found:
        path += f".{key}" if path else key
    return path or "the top level"


def deepest(raw: bytes, limit: int) -> int | None:
    """Byte position where brackets (outside strings) first nest deeper than ``limit``, or None."""
    c = np.frombuffer(raw, np.uint8)
    at, step = _brackets(c, len(c))
    depth = np.cumsum(step, dtype=np.int64)
    over = np.flatnonzero(depth > limit)
    return int(at[over[0]]) if len(over) else None
