"""``engine.eval_file``: the saved detections + GT of a run round-trip and are checked when read."""

from __future__ import annotations

import gzip

import pytest

from rcnn_lab.engine import eval_file


def test_build_keeps_the_scored_images_and_round_trips(tmp_path):
    from rcnn_lab.data.shapes import ShapesDataset

    ds = ShapesDataset(split="val", num_images=5, image_size=64)
    results = [{"image_id": 2, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    data = eval_file.build(results, [4, 2], ds.coco(), 30, ["bbox"])
    assert data["image_ids"] == [2, 4] and [im["id"] for im in data["ground_truth"]["images"]] == [2, 4]
    assert {a["image_id"] for a in data["ground_truth"]["annotations"]} == {2, 4}
    assert data["ground_truth"]["categories"] == ds.coco().dataset["categories"]
    path = eval_file.write(tmp_path / "eval" / "detections.json.gz", data)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    back = eval_file.read(path)
    assert back == data
    gt = eval_file.coco_gt(back)
    assert sorted(gt.imgs) == [2, 4] and len(gt.anns) == len(data["ground_truth"]["annotations"])


def test_read_rejects_other_files(tmp_path):
    plain = tmp_path / "x.json.gz"
    plain.write_text("not gzip")
    with pytest.raises(ValueError, match="x.json.gz is not an rcnn-lab eval file"):
        eval_file.read(plain)
    other = tmp_path / "y.json.gz"
    with gzip.open(other, "wt") as f:
        f.write('{"results": []}')
    with pytest.raises(ValueError, match="format 1"):
        eval_file.read(other)
