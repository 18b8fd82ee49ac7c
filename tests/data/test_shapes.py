"""The synthetic shapes dataset: contract, determinism, occlusion, geometry, COCO ground truth."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath

from rcnn_lab.config.types import Spec
from rcnn_lab.data.coco import decode_segmentation
from rcnn_lab.data.shapes import MIN_PIXELS, ShapesDataset, ShapeSpec, paint, shape_mask
from rcnn_lab.errors import ConfigError
from rcnn_lab.registry import DATASETS

ALL_KINDS = ("circle", "square", "triangle", "ellipse", "pentagon", "hexagon", "star", "ring", "cross")


def tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_registered_factory_follows_the_contract():
    ds = DATASETS.build(Spec("shapes", {"num_images": 4, "image_size": 64, "max_size": 32}), "data.train")
    assert len(ds) == 4 and ds.aspect_ratios() == [1.0] * 4
    assert [c["name"] for c in ds.categories] == ["circle", "square", "triangle", "ellipse", "star"]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    n = len(target["labels"])
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.uint8
    assert target["masks"].shape == (n, 64, 64)
    assert target["area"].dtype == torch.float32 and target["iscrowd"].dtype == torch.int64
    assert isinstance(target["image_id"], int)
    small = ShapesDataset(image_size=32)  # shape sizes default to fractions of the image
    assert (small.min_size, small.max_size) == (4, 16)


def test_every_image_is_a_pure_function_of_seed_split_index():
    a = ShapesDataset(num_images=8, image_size=64, max_size=32, cache=False)
    b = ShapesDataset(num_images=3, image_size=64, max_size=32, cache=True)  # a prefix, cached
    for i in range(3):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib)
        for key in ("boxes", "labels", "masks", "area"):
            assert torch.equal(ta[key], tb[key])
    assert torch.equal(b[1][0], b[1][0])  # cache hit gives the same image
    other_seed = ShapesDataset(num_images=3, image_size=64, max_size=32, seed=1)
    assert not torch.equal(a[0][0], other_seed[0][0])


def test_train_and_val_are_disjoint():
    def digests(split):
        ds = ShapesDataset(split=split, num_images=32, image_size=32, min_size=8, max_size=16, cache=False)
        return {hashlib.sha1(ds.generate(i).image.tobytes()).hexdigest() for i in range(32)}

    train, val = digests("train"), digests("val")
    assert len(train) == 32 and len(val) == 32
    assert not train & val


def test_boxes_are_tight_boxes_of_visible_masks():
    ds = ShapesDataset(num_images=12, image_size=96, max_objects=6, classes=list(ALL_KINDS), max_size=48)
    for i in range(len(ds)):
        _, t = ds[i]
        masks = t["masks"].bool()
        assert masks.sum(0).max() <= 1  # visible parts never overlap
        assert ((t["labels"] >= 1) & (t["labels"] <= len(ALL_KINDS))).all()
        for k in range(len(masks)):
            assert masks[k].sum() >= MIN_PIXELS
            assert t["boxes"][k].tolist() == tight_box(masks[k])
            assert t["area"][k].item() == masks[k].sum().item()


def test_visible_pixels_carry_their_shape_colour():
    ds = ShapesDataset(num_images=6, image_size=64, max_size=40, max_objects=5, noise=0.0)
    for i in range(len(ds)):
        image, t = ds[i]
        for mask in t["masks"].bool():
            pixels = image[:, mask]
            assert (pixels.max(1).values - pixels.min(1).values).max() == 0


def test_later_shapes_occlude_earlier_ones():
    first = ShapeSpec("circle", 20.0, 20.0, 12.0)
    second = ShapeSpec("square", 30.0, 26.0, 12.0, angle=0.3)

    def full(spec):
        out = np.zeros((48, 48), bool)
        (y0, y1, x0, x1), m = shape_mask(spec, 48, 48)
        out[y0:y1, x0:x1] = m
        return out

    owner = paint([first, second], 48, 48)
    assert np.array_equal(owner == 2, full(second))
    assert np.array_equal(owner == 1, full(first) & ~full(second))
    assert (full(first) & full(second)).any()  # they do overlap


@pytest.mark.parametrize("kind,vertices", [
    ("triangle", [(k * 120 + 60, 1.0) for k in range(3)]),
    ("square", [(k * 90 + 45, 1.0) for k in range(4)]),
    ("hexagon", [(k * 60 + 30, 1.0) for k in range(6)]),
    ("star", [(k * 36, 1.0 if k % 2 == 0 else math.cos(math.radians(72)) / math.cos(math.radians(36))) for k in range(10)]),
])
def test_polygon_equations_match_the_polygon(kind, vertices):
    size, r, angle = 64, 26.0, 0.4
    spec = ShapeSpec(kind, 32.0, 31.5, r, angle)
    (y0, y1, x0, x1), mask = shape_mask(spec, size, size)
    path = MplPath([(32.0 + rho * r * math.cos(angle + math.radians(a)), 31.5 + rho * r * math.sin(angle + math.radians(a)))
                    for a, rho in vertices])
    ys, xs = np.mgrid[y0:y1, x0:x1]
    inside = path.contains_points(np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)).reshape(mask.shape)
    assert (inside != mask).sum() <= 2  # only pixel centres on an edge may disagree
    assert mask.sum() > 100


def test_coco_ground_truth_matches_items():
    ds = ShapesDataset(num_images=5, image_size=64, max_size=32)
    gt = ds.coco()
    assert gt is ds.coco()
    assert sorted(gt.getImgIds()) == [ds[i][1]["image_id"] for i in range(5)]
    assert [c["id"] for c in gt.loadCats(gt.getCatIds())] == [1, 2, 3, 4, 5]
    for i in range(5):
        _, t = ds[i]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[t["image_id"]]))
        assert len(anns) == len(t["labels"])
        for k, ann in enumerate(anns):
            assert ann["category_id"] == t["labels"][k].item()
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == t["boxes"][k].tolist()
            assert np.array_equal(decode_segmentation(ann["segmentation"], 64, 64), t["masks"][k].numpy())
            assert ann["area"] == t["area"][k].item() and ann["iscrowd"] == 0


def test_invalid_arguments_name_the_key():
    spec = Spec("shapes", {"classes": ["circle", "hexgon"], "max_size": 300, "image_size": 64})
    with pytest.raises(ConfigError) as exc:
        DATASETS.build(spec, "data.train")
    paths = {p.path: p.message for p in exc.value.problems}
    assert "did you mean 'hexagon'" in paths["data.train.classes[1]"]
    assert "image_size" in paths["data.train.max_size"]
