"""The COCO-format dataset: decoding, label mapping, crowd, empty images, errors; export round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from rcnn_lab.config.types import Spec
from rcnn_lab.data.coco import CocoDataset
from rcnn_lab.data.export import export_shapes, write_png
from rcnn_lab.data.shapes import ShapesDataset
from rcnn_lab.errors import ConfigError
from rcnn_lab.registry import DATASETS


def box_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    counts, current, run = [], 0, 0
    for value in mask.flatten(order="F"):
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def tiny(tmp_path):
    """Three images (one in a subfolder, one without annotations) and every segmentation kind."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    sizes = {"a.png": (20, 30), "b.png": (30, 20), "sub/c.png": (16, 16)}
    for name, (h, w) in sizes.items():
        write_png(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), root / name)
    ann = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 2, 8, 6], "area": 48, "iscrowd": 0,
         "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [15, 10, 10, 5], "area": 50, "iscrowd": 0,
         "segmentation": compressed_rle(box_mask(20, 30, 15, 10, 25, 15))},
        {"id": 3, "image_id": 10, "category_id": 7, "bbox": [25, 0, 5, 4], "iscrowd": 0,
         "segmentation": uncompressed_rle(box_mask(20, 30, 25, 0, 30, 4))},
        {"id": 4, "image_id": 10, "category_id": 3, "bbox": [0, 15, 10, 5], "area": 50, "iscrowd": 1,
         "segmentation": uncompressed_rle(box_mask(20, 30, 0, 15, 10, 20))},
        {"id": 5, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 3], "area": 0, "iscrowd": 0, "segmentation": []},
        {"id": 6, "image_id": 12, "category_id": 3, "bbox": [4, 4, 6, 6], "area": 36},
    ]
    data = {
        "images": [{"id": 10, "file_name": "a.png", "height": 20, "width": 30},
                   {"id": 11, "file_name": "b.png", "height": 30, "width": 20},
                   {"id": 12, "file_name": "sub/c.png", "height": 16, "width": 16}],
        "annotations": ann,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 5, "name": "unused"}],
    }
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return root, path, data


def test_polygons_and_both_rle_kinds_decode(tiny):
    root, ann, _ = tiny
    ds = DATASETS.build(Spec("coco", {"images": str(root), "annotations": str(ann)}), "data.train")
    assert len(ds) == 3
    assert ds.categories == [{"id": 3, "name": "three"}, {"id": 5, "name": "unused"}, {"id": 7, "name": "seven"}]
    assert ds.aspect_ratios() == [1.5, 20 / 30, 1.0]
    image, t = ds[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and t["image_id"] == 10
    assert t["labels"].tolist() == [3, 1, 3]  # 7 -> 3, 3 -> 1; crowd and zero-width boxes left out
    assert t["boxes"].tolist() == [[2, 2, 10, 8], [15, 10, 25, 15], [25, 0, 30, 4]]
    expected = [box_mask(20, 30, 2, 2, 10, 8), box_mask(20, 30, 15, 10, 25, 15), box_mask(20, 30, 25, 0, 30, 4)]
    assert np.array_equal(t["masks"].numpy(), np.stack(expected))
    assert t["area"].tolist() == [48, 50, 20]  # missing area: the mask's
    assert t["iscrowd"].tolist() == [0, 0, 0]


def test_images_without_annotations_give_empty_targets(tiny):
    root, ann, _ = tiny
    _, t = CocoDataset(root, ann)[1]
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["masks"].shape == (0, 30, 20) and t["masks"].dtype == torch.uint8
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["area"].shape == (0,) and t["iscrowd"].shape == (0,)
    assert len(CocoDataset(root, ann, remove_images_without_annotations=True)) == 2


def test_missing_segmentation_uses_the_box(tiny):
    root, ann, _ = tiny
    _, t = CocoDataset(root, ann)[2]
    assert np.array_equal(t["masks"][0].numpy(), box_mask(16, 16, 4, 4, 10, 10))


def test_crowd_is_dropped_from_targets_but_kept_for_evaluation(tiny):
    root, ann, _ = tiny
    gt = CocoDataset(root, ann).coco()
    crowd = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[10])) if a["iscrowd"]]
    assert [a["id"] for a in crowd] == [4]
    assert sorted(gt.getCatIds()) == [3, 5, 7] and sorted(gt.getImgIds()) == [10, 11, 12]
    assert gt.anns[3]["area"] == 20  # filled in from the mask
    _, kept = CocoDataset(root, ann, crowd="keep")[0]
    assert kept["iscrowd"].tolist() == [0, 0, 0, 1]
    assert kept["boxes"][3].tolist() == [0, 15, 10, 20]


def test_category_filter_relabels_contiguously(tiny):
    root, ann, _ = tiny
    ds = DATASETS.build(Spec("coco", {"images": str(root), "annotations": str(ann), "category_ids": [7]}), "d")
    assert ds.categories == [{"id": 7, "name": "seven"}]
    assert ds[0][1]["labels"].tolist() == [1, 1]
    assert {a["category_id"] for a in ds.coco().anns.values()} == {7}


def problems_of(spec: dict, key: str = "data.train") -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        DATASETS.build(Spec("coco", spec), key)
    return {p.path: str(p) for p in exc.value.problems}


def test_malformed_json_names_file_key_and_position(tiny, tmp_path):
    root, _, _ = tiny
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,}\n]}')
    problems = problems_of({"images": str(root), "annotations": str(bad)})
    msg = problems["data.train.annotations"]
    assert "bad.json" in msg and "line 2 column" in msg and "fix the file" in msg
    missing = problems_of({"images": str(root), "annotations": str(tmp_path / "nope.json")})
    assert "nope.json" in missing["data.train.annotations"] and "does not exist" in missing["data.train.annotations"]


def test_missing_images_folder_names_the_key(tiny, tmp_path):
    _, ann, _ = tiny
    problems = problems_of({"images": str(tmp_path / "nowhere"), "annotations": str(ann)}, "data.val")
    assert "nowhere" in problems["data.val.images"] and "does not exist" in problems["data.val.images"]


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d.pop("categories"), "missing top-level list(s) 'categories'"),
    (lambda d: d["images"][0].pop("file_name"), "images[0]: needs 'file_name' (missing)"),
    (lambda d: d["annotations"][1].update(image_id=99), "annotations[1]: image_id 99 is not in images"),
    (lambda d: d["annotations"][0].update(category_id=42), "annotations[0]: category_id 42 is not in categories"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), "annotations[0].segmentation: polygons must be lists"),
    (lambda d: d["annotations"][1]["segmentation"].update(size=[5, 5]), "annotations[1].segmentation: RLE size [5, 5] differs"),
])
def test_bad_annotation_files_name_the_entry(tiny, edit, expected):
    root, ann, data = tiny
    edit(data)
    ann.write_text(json.dumps(data))
    problems = problems_of({"images": str(root), "annotations": str(ann)})
    assert expected in problems["data.train.annotations"]
    assert problems["data.train.annotations"].startswith(str(ann.name)) or ann.name in problems["data.train.annotations"]


def test_missing_image_file_fails_at_build_time(tiny):
    root, ann, _ = tiny
    (root / "sub" / "c.png").unlink()
    problems = problems_of({"images": str(root), "annotations": str(ann)})
    assert "sub/c.png" in problems["data.train.images"] and "1 image file(s)" in problems["data.train.images"]


def test_image_size_disagreeing_with_json_is_reported(tiny):
    root, ann, _ = tiny
    write_png(torch.zeros((3, 7, 9), dtype=torch.uint8), root / "b.png")
    with pytest.raises(ConfigError, match=r"b.png' is 9x7 .* says 20x30"):
        CocoDataset(root, ann)[1]


def test_exported_shapes_load_back_identically(tmp_path):
    kwargs = dict(num_images=6, image_size=64, max_size=32, max_objects=5, classes=["star", "ring", "square", "cross"])
    out = export_shapes(tmp_path / "shapes", split="val", seed=3, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "images"]
    loaded = CocoDataset(out / "images", out / "annotations.json")
    source = ShapesDataset(split="val", seed=3, **{**kwargs, "classes": tuple(kwargs["classes"])})
    assert loaded.categories == [{k: v for k, v in c.items()} for c in source.categories]
    for i in range(len(source)):
        (li, lt), (si, st) = loaded[i], source[i]
        assert torch.equal(li, si)
        assert lt["image_id"] == st["image_id"]
        for key in ("boxes", "labels", "masks", "area", "iscrowd"):
            assert torch.equal(lt[key], st[key]), key
    assert loaded.coco().dataset["annotations"] == source.coco().dataset["annotations"]
    assert json.loads((out / "annotations.json").read_text())["info"]["params"]["seed"] == 3


def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export_shapes(out, num_images=2, image_size=32, min_size=8, max_size=16)
    assert (out / "keep.txt").exists()
    export_shapes(out, num_images=2, image_size=32, min_size=8, max_size=16, overwrite=True)
    assert not (out / "keep.txt").exists() and len(list((out / "images").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


def _four_images(tmp_path):
    """A: only a crowd region; B: only a box outside the image; C: only a 1-px-wide box; D: nothing; E: an instance."""
    root = tmp_path / "imgs"
    root.mkdir()
    images = [{"id": i, "file_name": f"{n}.png", "width": 10, "height": 8} for i, n in enumerate("ABCDE", 1)]
    for img in images:
        write_png(torch.zeros((3, 8, 10), dtype=torch.uint8), root / img["file_name"])
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 1},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [20, 1, 4, 4], "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [1, 1, 1, 4], "iscrowd": 0},
            {"id": 4, "image_id": 5, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0},
            {"id": 5, "image_id": 5, "category_id": 2, "bbox": [1, 1, 4, 4], "iscrowd": 0}]
    ann = tmp_path / "four.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return root, ann


def test_torchvision_filter_rule_is_the_reference_scripts(tmp_path):
    root, ann = _four_images(tmp_path)
    ids = lambda ds: [ds.index.image(int(r))["id"] for r in ds._rows]  # noqa: E731
    assert ids(CocoDataset(root, ann, remove_images_without_annotations=True)) == [3, 5]  # a 1-px box is an instance
    ds = CocoDataset(root, ann, remove_images_without_annotations=True, filter_rule="torchvision")
    assert ids(ds) == [1, 2, 5]  # crowd-only and outside-only kept, <= 1 px and empty dropped
    assert ds[0][1]["boxes"].shape == (0, 4) and ds[1][1]["boxes"].shape == (0, 4)  # kept with empty targets
    # the reference's rule, written out (coco_utils._coco_remove_images_without_annotations, no keypoints)
    data = json.loads(ann.read_text())
    by_image = {img["id"]: [a for a in data["annotations"] if a["image_id"] == img["id"]] for img in data["images"]}
    kept = [i for i, anno in by_image.items() if anno and not all(any(o <= 1 for o in a["bbox"][2:]) for a in anno)]
    assert ids(ds) == kept
    with pytest.raises(ConfigError, match="filter_rule: takes effect with remove_images_without_annotations: true"):
        DATASETS.build(Spec("coco", {"images": str(root), "annotations": str(ann), "filter_rule": "torchvision"}), "d")


def test_a_split_left_empty_by_its_filters_is_refused(tmp_path):
    root, ann = _four_images(tmp_path)
    assert len(CocoDataset(root, ann, category_ids=[2], remove_images_without_annotations=True)) == 1  # image 5
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][:4]
    ann.write_text(json.dumps(data))
    problems = problems_of({"images": str(root), "annotations": str(ann), "category_ids": [2],
                            "remove_images_without_annotations": True})
    msg = problems["data.train.remove_images_without_annotations"]
    assert "leaves none of the 5 images of" in msg and "among category_ids [2]" in msg and "set remove_images" in msg
    data["images"] = []
    data["annotations"] = []
    ann.write_text(json.dumps(data))
    assert "lists no images" in problems_of({"images": str(root), "annotations": str(ann)})["data.train.annotations"]


def test_an_annotations_path_that_is_a_folder_says_so(tiny, tmp_path):
    root, _, _ = tiny
    msg = problems_of({"images": str(root), "annotations": str(root)})["data.train.annotations"]
    assert "is a folder, not a file" in msg
