"""Reading COCO files: the fast path builds exactly the plain path's index, and hands unusual files to it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rcnn_lab.data import coco as coco_module
from rcnn_lab.data.coco import CocoDataset
from rcnn_lab.data.coco_checks import check_segmentation, polygon_problem
from rcnn_lab.data.coco_index import Progress
from rcnn_lab.data.coco_json import _polygons_ok, parse_fast
from rcnn_lab.data.export import export_shapes
from rcnn_lab.errors import ConfigError, display_path
from tests.data.test_coco import tiny  # noqa: F401  (fixture)


def plain(monkeypatch, *args, **kwargs) -> CocoDataset:
    """The dataset built by the plain path alone (json.loads and the entry-by-entry check)."""
    with monkeypatch.context() as m:
        m.setattr(coco_module, "parse_fast", lambda *a: None)
        return CocoDataset(*args, **kwargs, cache=False)  # a cached entry would skip the plain path


def same_dataset(a: CocoDataset, b: CocoDataset) -> None:
    for name in a.index.__dataclass_fields__:
        if name not in ("ann_json", "ann_json_offsets"):  # the fast path keeps the file's bytes, the plain one re-encodes
            x, y = getattr(a.index, name), getattr(b.index, name)
            assert (np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y), name
    assert [a.index.annotations(r) for r in range(len(a.index))] == [b.index.annotations(r) for r in range(len(b.index))]
    assert a.categories == b.categories and len(a) == len(b) and a.aspect_ratios() == b.aspect_ratios()
    for i in range(len(a)):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib) and ta["image_id"] == tb["image_id"]
        for key in ("boxes", "labels", "masks", "area", "iscrowd"):
            assert torch.equal(ta[key], tb[key]), key
    assert a.to_coco_dict() == b.to_coco_dict()


@pytest.mark.parametrize("options", [{}, {"crowd": "keep"}, {"remove_images_without_annotations": True},
                                     {"category_ids": [7]}, {"max_images": 2}])
def test_fast_path_builds_the_plain_paths_dataset(tiny, monkeypatch, options):  # noqa: F811
    root, ann, _ = tiny
    raw = ann.read_bytes()
    assert parse_fast(raw, ann.name, options.get("category_ids"), Progress("t", False)) is not None  # not a fallback
    same_dataset(CocoDataset(root, ann, **options), plain(monkeypatch, root, ann, **options))


def test_exported_shapes_take_the_fast_path(tmp_path, monkeypatch):
    out = export_shapes(tmp_path / "s", num_images=5, image_size=48, max_size=24)
    assert parse_fast((out / "annotations.json").read_bytes(), "a", None, Progress("t", False)) is not None
    same_dataset(CocoDataset(out / "images", out / "annotations.json"), plain(monkeypatch, out / "images", out / "annotations.json"))


def test_unusual_files_take_the_plain_path_and_load_as_before(tiny, monkeypatch):  # noqa: F811
    root, ann, data = tiny
    data["annotations"][1]["extra"] = {"kept": [1, 2], "score": float("nan")}  # json accepts NaN, msgspec does not
    ann.write_text(json.dumps(data))
    assert parse_fast(ann.read_bytes(), ann.name, None, Progress("t", False)) is None
    ds = CocoDataset(root, ann)
    assert not ds.index.strict_json
    extra = ds.to_coco_dict()["annotations"][1]["extra"]
    assert extra["kept"] == [1, 2] and np.isnan(extra["score"])


POLYGON_CASES = [
    [], [[1, 2, 3, 4, 5, 6]], [[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5, 6, 7, 8]], [[]], [[1, 2, 3, 4, 5, 6], []],
    [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4]], [1, 2, 3, 4, 5, 6], [[[1, 2, 3, 4, 5, 6]]], [[1, 2, 3, 4, 5, True]],
    [[1, 2, 3, 4, 5, None]], [[1, 2, 3, 4, 5, "6"]], [[1e5, -2.5, 3e-2, 4, 5, 6]], [[1, 2, 3, 4, 5, {"a": 1}]],
    [[0.5, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14]],
]


@pytest.mark.parametrize("seg", POLYGON_CASES)
def test_vectorised_polygon_check_agrees_with_the_plain_check(seg):
    expected = check_segmentation(seg, 10, 10) is None
    assert _polygons_ok([json.dumps(seg).encode()]) == expected
    assert _polygons_ok([json.dumps(seg, indent=1).encode()]) == expected  # whitespace anywhere
    assert _polygons_ok([b"[[1,2,3,4,5,6]]", json.dumps(seg).encode(), b"[]"]) == expected  # among others


def test_progress_prints_one_line_per_phase(tiny, capsys):  # noqa: F811
    root, ann, _ = tiny
    CocoDataset(root, ann)
    assert capsys.readouterr().err == ""  # small files build silently
    CocoDataset(root, ann, progress=True, cache=False)  # the cache's lines: tests/data/test_coco_cache.py
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2].split()[0] for line in lines] == ["read", "parsed", "checked", "indexed", "found"]
    assert all(line.startswith("rcnn-lab: coco annotations.json: ") and line.endswith(" s)") for line in lines)
    assert "3 images, 6 annotations" in lines[2]


def _set(path: str, value):
    """An edit of the tiny file: ``path`` like ``annotations.0.segmentation.0.3``."""
    def edit(data):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target = data
        for p in parents:
            target = target[p]
        target[last] = value
    return edit


BAD_FILES = [  # (edit of the tiny file, the entry and reason the one line names)
    (_set("annotations.0.segmentation.0.3", float("nan")), "annotations[0].segmentation[0][3]: is nan"),
    (_set("annotations.0.segmentation.0.3", float("inf")), "annotations[0].segmentation[0][3]: is inf"),
    (_set("annotations.0.segmentation.0.3", 1e400), "annotations[0].segmentation[0][3]: is inf"),
    (_set("annotations.0.segmentation.0.3", 3e6), "annotations[0].segmentation[0][3]: is 3000000.0, beyond"),
    (_set("annotations.0.segmentation.0", [0, 0, 1e6, 0, -1e6, 1e6, 1e6, -1e6]), "annotations[0].segmentation[0]: outline of"),
    (_set("annotations.5.bbox.2", float("nan")), "annotations[5].bbox[2]: is nan"),
    (_set("annotations.5.bbox.1", -float("inf")), "annotations[5].bbox[1]: is -inf"),
    (_set("annotations.5.bbox", [4, 4, -6, 6]), "annotations[5].bbox: [4, 4, -6, 6] has a negative width or height"),
    (_set("annotations.4.id", 1), "annotations[4].id: 1 is also the id of annotations[0]; fix the file so that annotation ids are unique"),
    (_set("annotations.2.id", 2**64), "annotations[2].id: 18446744073709551616 does not fit in 64 bits"),
    (_set("annotations.2.id", "7"), "annotations[2].id: must be an integer, got '7'"),
    (_set("images.1.id", -(2**63) - 1), "images[1].id: -9223372036854775809 does not fit in 64 bits"),
    (_set("categories.2.id", 2**63), "categories[2].id: 9223372036854775808 does not fit"),
    (_set("annotations.1.segmentation.counts", "0000"), "annotations[1].segmentation: RLE runs cover 0 pixels"),
    (_set("annotations.2.segmentation.counts", [10, 20]), "annotations[2].segmentation: RLE runs cover 30 pixels"),
    (_set("images.0.width", 10**7), "images[0]: width x height is 10,000,000 x 20 = 200,000,000 pixels"),
    (_set("images.2.height", 10**9), "images[2]: width x height is 16 x 1,000,000,000"),
    (_set("images.2.file_name", "/etc/passwd"), "images[2].file_name: '/etc/passwd' is an absolute path"),
    (_set("images.2.file_name", "sub/"), "images[2].file_name: 'sub/' names a folder"),
]


@pytest.mark.parametrize("edit,expected", BAD_FILES, ids=[e for _, e in BAD_FILES])
def test_bad_values_are_one_problem_naming_the_entry(tiny, edit, expected):  # noqa: F811
    root, ann, data = tiny
    edit(data)
    ann.write_text(json.dumps(data))
    assert parse_fast(ann.read_bytes(), ann.name, None, Progress("t", False)) is None  # the plain path names it
    with pytest.raises(ConfigError) as exc:
        CocoDataset(root, ann, cache=False)
    (line,) = [str(p) for p in exc.value.problems]
    assert line.startswith(f"{display_path(ann)}: annotations: {expected}"), line
    assert any(fix in line for fix in ("; fix", "; give", "; name the", "; use ids", "; check the sizes")), line


def test_5000_digit_ids_and_deep_nesting_are_named(tiny):  # noqa: F811
    root, ann, data = tiny
    text = json.dumps(data)
    for bad, expected in [
        (text.replace('"id": 11,', '"id": ' + "9" * 5000 + ","), "images[1].id: a 5,000-digit integer does not fit"),
        (text.replace('"segmentation": []', '"segmentation": ' + "[" * 100_000 + "]" * 100_000),
         "annotations[4].segmentation: nests deeper than 32 levels"),
    ]:
        ann.write_text(bad)
        with pytest.raises(ConfigError) as exc:
            CocoDataset(root, ann, cache=False)
        assert len(exc.value.problems) == 1 and expected in str(exc.value), str(exc.value)


def test_the_cheap_polygon_bound_agrees_with_the_exact_check():
    """_polygons_ok decodes numbers only where a digit-count bound does not clear the limits: same answers."""
    rng = np.random.default_rng(0)
    for _ in range(1500):
        n = int(rng.integers(3, 40)) * 2
        scale = 10.0 ** rng.integers(0, 8)
        poly = [int(v) if rng.random() < 0.3 else v for v in np.round(rng.uniform(-scale, scale, n), int(rng.integers(0, 3)))]
        exact = polygon_problem(poly) is None
        assert _polygons_ok([json.dumps([poly]).encode()]) == exact, poly
        assert _polygons_ok([json.dumps([[1, 2, 3, 4, 5, 6], poly]).replace("e+", "E").encode()]) == exact, poly


def test_annotation_ids_are_optional_in_both_paths(tiny, monkeypatch):  # noqa: F811
    root, ann, data = tiny
    data["annotations"][0]["id"] = None
    del data["annotations"][1]["id"]
    ann.write_text(json.dumps(data))
    assert parse_fast(ann.read_bytes(), ann.name, None, Progress("t", False)) is not None
    same_dataset(CocoDataset(root, ann), plain(monkeypatch, root, ann))
    ids = sorted(a["id"] for a in CocoDataset(root, ann).to_coco_dict()["annotations"])
    assert ids == [3, 4, 5, 6, 7, 8]  # filled in after the largest id given
