"""The limits a COCO file is held to before pycocotools sees it: RLE decoding, polygon outlines, ids, entry names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rcnn_lab.data.coco_checks import (
    MAX_OUTLINE,
    Huge,
    bbox_problem,
    deepest,
    id_problem,
    image_size_problem,
    locate,
    name_problem,
    outline_points,
    parse_int,
    polygon_problem,
    polygons_fit,
    rle_problem,
)
from rcnn_lab.data.images import MAX_PIXELS


def _mask(seed: int, h: int = 23, w: int = 31) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w)) < 0.3).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_compressed_rle_that_pycocotools_wrote_passes_and_its_runs_match(seed):
    mask = _mask(seed)
    rle = mask_utils.encode(np.asfortranarray(mask))
    seg = {"size": [23, 31], "counts": rle["counts"].decode()}
    assert rle_problem(seg, 23, 31) is None
    assert mask_utils.area(rle) == mask.sum()


@pytest.mark.parametrize("counts,why", [
    ("", "counts is empty"),
    ("0000", "cover 0 pixels"),
    ("é", "not ASCII"),
    ("0 0", "outside COCO's RLE alphabet"),
    ("o", "ends inside a number"),
    ("oooooo0", "more than 6 characters"),
    ("0@", "negative run length"),
])
def test_compressed_rle_that_does_not_decode_is_named(counts, why):
    assert why in rle_problem({"size": [23, 31], "counts": counts}, 23, 31)


def test_compressed_rle_cut_short_or_extended_is_refused():
    counts = mask_utils.encode(np.asfortranarray(_mask(0)))["counts"].decode()
    assert "cover" in rle_problem({"size": [23, 31], "counts": counts[:-2]}, 23, 31)
    assert "cover" in rle_problem({"size": [23, 31], "counts": counts + "3"}, 23, 31)


@pytest.mark.parametrize("counts,why", [
    ([10, 703], None), ([713], None), ([0, 713], None),
    ([10, 700], "cover 710 pixels, the image has 23x31 = 713"),
    ([10, -1, 704], "negative run length"), ([10, 703.0], "list of integers"), ([True, 712], "list of integers"),
    (list(range(800)), "more than a 23x31 mask can hold"), ({"a": 1}, "string (compressed) or a list"),
])
def test_uncompressed_rle(counts, why):
    found = rle_problem({"size": [23, 31], "counts": counts}, 23, 31)
    assert found is None if why is None else why in found


def test_rle_size_must_be_the_images():
    assert "differs from the image's" in rle_problem({"size": [31, 23], "counts": [713]}, 23, 31)
    assert "must be [height, width]" in rle_problem({"size": [23.0, 31], "counts": [713]}, 23, 31)


def test_outline_points_is_what_pycocotools_draws():
    # rleFrPoly: each edge of the polygon scaled by 5 draws max(|dx|, |dy|) + 1 points
    square = np.array([[0, 0], [10, 0], [10, 4], [0, 4]], np.float64)
    assert outline_points(square, np.zeros(4, np.int64), 1).tolist() == [51 + 21 + 51 + 21]
    two = np.concatenate([square, square * 2])
    assert outline_points(two, np.repeat([0, 1], 4), 2).tolist() == [144, 101 + 41 + 101 + 41]


@pytest.mark.parametrize("poly,why", [
    ([0, 0, 10, 0, 10, 10], None),
    ([0, 0, 10, float("nan"), 10, 10], ("[3]", "is nan")),
    ([0, 0, 10, float("inf"), 10, 10], ("[3]", "is inf")),
    ([0, 0, 10, 2e6, 10, 10], ("[3]", "beyond")),
    ([0, 0, 1e6, 0, -1e6, 1e6, 1e6, -1e6], ("", "outline of")),
])
def test_polygon_limits(poly, why):
    found = polygon_problem(poly)
    assert found is None if why is None else (found[0] == why[0] and why[1] in found[1])
    lengths = np.array([len(poly)])
    assert polygons_fit(np.array(poly, np.float64), lengths) == (why is None)
    # among good polygons, the vectorised check still finds it
    good = [0, 0, 5, 0, 5, 5]
    numbers = np.array(good + poly + good, np.float64)
    assert polygons_fit(numbers, np.array([6, len(poly), 6])) == (why is None)


def test_outline_limit_is_per_polygon():
    side = MAX_OUTLINE / 5 / 4 - 2  # a square just under the limit
    square = [0, 0, side, 0, side, side, 0, side]
    assert polygon_problem(square) is None and polygons_fit(np.array(square * 3, np.float64), np.array([8, 8, 8]))
    assert polygon_problem([v * 1.01 for v in square]) is not None


@pytest.mark.parametrize("bbox,why", [
    ([0, 0, 0, 0], None), ([-5, -5, 3, 3], None),
    ([0, 0, -1, 3], ("", "negative width or height")), ([0, float("nan"), 1, 3], ("[1]", "is nan")),
    ([0, 0, 1e7, 3], ("[2]", "beyond")),
])
def test_bbox_limits(bbox, why):
    found = bbox_problem(bbox)
    assert found is None if why is None else (found[0] == why[0] and why[1] in found[1])


def test_ids_and_sizes():
    assert id_problem(2**63 - 1) is None and id_problem(-(2**63)) is None
    assert "does not fit in 64 bits" in id_problem(2**63)
    assert "a 5,000-digit integer does not fit" in id_problem(json.loads("[" + "9" * 5000 + "]", parse_int=parse_int)[0])
    assert isinstance(parse_int("-" + "1" * 4001), Huge) and parse_int("-" + "1" * 4000) == -int("1" * 4000)
    assert "does not fit" in id_problem(parse_int("-" + "1" * 4001)) and parse_int("-123") == -123
    assert image_size_problem(640, 480) is None
    assert "both must be >= 1" in image_size_problem(0, 480)
    assert f"over the limit of {MAX_PIXELS:,}" in image_size_problem(20000, 20000)


@pytest.mark.parametrize("name,why", [
    ("a.jpg", None), ("sub/a.jpg", None), ("../shared/a.jpg", None),
    ("", "is empty"), ("  ", "is empty"), ("/etc/passwd", "absolute path"), ("C:\\x.jpg", "absolute path"),
    ("a\0.jpg", "NUL"), ("sub/", "names a folder"),
])
def test_file_names(name, why):
    found = name_problem(name)
    assert found is None if why is None else why in found


def test_locate_names_the_entry_outside_strings():
    data = {"images": [{"id": 1, "file_name": 'odd [{"name.png', "width": 4, "height": 4}],
            "annotations": [{"id": 1}, {"id": 2, "segmentation": [[0, 1, 2, 3, 4, 5]]}]}
    raw = json.dumps(data).encode()
    assert locate(raw, raw.index(b"[[0")) == "annotations[1].segmentation"
    assert locate(raw, raw.index(b"[0,") + 1) == "annotations[1].segmentation"
    assert locate(raw, raw.index(b'"width": 4') + 9) == "images[0].width"
    assert deepest(raw, 5) is None and deepest(raw, 4) == raw.index(b"[0,")
    escaped = b'{"a": ["x\\\\", [[1]]], "b": "\\"[["}'  # an escaped backslash before a closing quote, a quoted quote
    assert json.loads(escaped) and deepest(escaped, 3) == escaped.index(b"[1]")
