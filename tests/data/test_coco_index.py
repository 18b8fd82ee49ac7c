"""The serialized index: numpy buffers only, the annotations exactly as the file holds them."""

from __future__ import annotations

import gc
import json
import pickle

import numpy as np
import torch

from rcnn_lab.data.coco import CocoDataset
from rcnn_lab.data.coco_index import CocoIndex
from rcnn_lab.data.export import write_png


def many(tmp_path, images: int = 40, per_image: int = 50):
    """A file with 2,000 annotations over 40 images listed in a shuffled id order."""
    root = tmp_path / "images"
    root.mkdir()
    write_png(torch.zeros((3, 24, 32), dtype=torch.uint8), root / "x.png")
    ids = np.random.default_rng(0).permutation(np.arange(100, 100 + images)).tolist()
    data = {"images": [{"id": i, "file_name": "x.png", "width": 32, "height": 24} for i in ids],
            "annotations": [{"id": k, "image_id": ids[k % images], "category_id": 1 + k % 3, "bbox": [1, 2, 3 + k % 5, 4],
                             "iscrowd": int(k % 17 == 0), "segmentation": [[1, 2, 4, 2, 4, 6, 1, 6]], "note": f"n{k}"}
                            for k in range(images * per_image)],
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    return root, path, data


def test_index_holds_numpy_buffers_not_per_annotation_objects(tmp_path):
    root, path, _ = many(tmp_path)
    gc.collect()
    before = len(gc.get_objects())
    ds = CocoDataset(root, path)
    gc.collect()
    assert len(gc.get_objects()) - before < 200  # 2,000 annotations, no Python object per annotation left
    fields = [getattr(ds.index, f) for f in ds.index.__dataclass_fields__]
    assert all(isinstance(v, np.ndarray) for v in fields[:-1]) and isinstance(ds._rows, np.ndarray)
    assert len(pickle.dumps(ds)) < ds.index.nbytes + 20_000  # what a spawned worker receives: the buffers


def test_annotations_come_back_verbatim_grouped_by_image_in_file_order(tmp_path):
    root, path, data = many(tmp_path)
    index = CocoDataset(root, path).index
    assert index.image_ids.tolist() == sorted(img["id"] for img in data["images"])
    for row, image_id in enumerate(index.image_ids.tolist()):
        expected = [a for a in data["annotations"] if a["image_id"] == image_id]
        assert index.annotations(row) == expected
        assert index.image(row) == {"id": image_id, "file_name": "x.png", "width": 32, "height": 24}
    assert index.boxes.shape == (2000, 4) and index.crowd.sum() == sum(a["iscrowd"] for a in data["annotations"])


def test_build_from_dicts_handles_images_without_annotations():
    images = [{"id": 5, "file_name": "é/b.png", "width": 3, "height": 2}, {"id": 9, "file_name": "a.png", "width": 4, "height": 4}]
    index = CocoIndex.from_dicts(images, {5: [], 9: [{"bbox": [0, 0, 1, 1], "iscrowd": 1, "x": None}]})
    assert len(index) == 2 and index.num_annotations == 1
    assert index.annotations(0) == [] and index.annotations(1) == [{"bbox": [0, 0, 1, 1], "iscrowd": 1, "x": None}]
    assert index.file_name(0) == "é/b.png" and index.crowd.tolist() == [True]
