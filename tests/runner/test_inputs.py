"""``runner.inputs``: what a run logs as its datasets (name, source, digest, counts)."""

from __future__ import annotations

import json

from rcnn_lab.config.types import Spec
from rcnn_lab.runner.inputs import describe


def test_generated_shapes_name_their_generator_and_count_the_validation_annotations():
    from rcnn_lab.data.shapes import ShapesDataset

    val = ShapesDataset(split="val", num_images=3, image_size=64)
    spec = Spec("shapes", {"split": "val", "num_images": 3, "image_size": 64})
    d = describe(spec, val, "val")
    assert d["name"] == "shapes/val" and d["source_type"] == "code"
    assert json.loads(d["source"]) == {"generator": "rcnn_lab.data.shapes", "split": "val", "num_images": 3, "image_size": 64}
    assert json.loads(d["profile"]) == {"images": 3, "categories": 5, "annotations": len(val.coco().dataset["annotations"])}
    assert len(d["digest"]) == 12 and describe(spec, val, "val")["digest"] == d["digest"]
    other = Spec("shapes", {"split": "val", "num_images": 3, "image_size": 96})
    assert describe(other, val, "val")["digest"] != d["digest"]
    train = ShapesDataset(split="train", num_images=4, image_size=64)
    assert json.loads(describe(Spec("shapes", {"split": "train"}), train, "train")["profile"]) == {"images": 4, "categories": 5}
    assert train._coco is None  # a training set's GT is never generated just to count it


def test_coco_files_are_named_after_the_annotation_file():
    data = type("D", (), {"categories": [{"id": 1, "name": "x"}], "__len__": lambda self: 7})()
    spec = Spec("coco", {"images": "/data/val2017", "annotations": "/data/annotations/instances_val2017.json"})
    d = describe(spec, data, "train")
    assert d["name"] == "instances_val2017.json" and d["source_type"] == "local"
    assert json.loads(d["source"]) == {"uri": "/data/annotations/instances_val2017.json", "images": "/data/val2017"}
    assert json.loads(d["profile"]) == {"images": 7, "categories": 1}
