"""``rcnn-lab export-shapes``: the COCO copy loads back identical to the shapes dataset; bad args exit 2."""

from __future__ import annotations

import os

import pytest
import torch

from rcnn_lab.cli.main import main
from rcnn_lab.config.types import Spec
from rcnn_lab.registry import DATASETS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

ARGS = {"split": "val", "num_images": 6, "image_size": 64, "seed": 3}


def export(out, *extra: str) -> int:
    return main(["export-shapes", "--out", str(out), "--split", ARGS["split"], "--num-images", str(ARGS["num_images"]),
                 "--image-size", str(ARGS["image_size"]), "--seed", str(ARGS["seed"]), *extra])


def test_export_loads_back_identical_through_the_coco_dataset(tmp_path, capsys):
    out = tmp_path / "shapes_val"
    assert export(out) == 0
    assert f"wrote {ARGS['num_images']} val images" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["annotations.json", "images"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no scratch folder left

    shapes = DATASETS.build(Spec("shapes", dict(ARGS)), "data.val")
    coco = DATASETS.build(Spec("coco", {"images": str(out / "images"), "annotations": str(out / "annotations.json")}),
                          "data.val")
    assert coco.categories == shapes.categories
    assert len(coco) == len(shapes) == ARGS["num_images"]
    by_id = {coco[i][1]["image_id"]: coco[i] for i in range(len(coco))}
    instances = 0
    for i in range(len(shapes)):
        image, target = shapes[i]
        c_image, c_target = by_id[target["image_id"]]
        assert torch.equal(c_image, image)
        for key in ("boxes", "labels", "masks", "area", "iscrowd"):
            assert c_target[key].dtype == target[key].dtype, key
            assert torch.equal(c_target[key], target[key]), key
        instances += len(target["labels"])
    assert instances > ARGS["num_images"]  # several shapes per image, so the comparison means something
    assert len(coco.coco().getAnnIds()) == len(shapes.coco().getAnnIds()) == instances


def test_existing_folder_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export(out) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--out" in line and "not empty" in line and "--overwrite" in line
    assert os.listdir(out) == ["keep.txt"]
    assert export(out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["annotations.json", "images"]


@pytest.mark.parametrize("argv, expected", [
    (["--num-images", "0"], "--num-images: must be 1..10,000,000, got 0"),
    (["--image-size", "-4"], "--image-size: must be 8..4,096, got -4"),
])
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    assert main(["export-shapes", "--out", str(out), *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rcnn-lab export-shapes: error: ") and expected in line
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, expected", [
    (["--num-images", "many"], "invalid int value: 'many'"),
    (["--split", "test"], "invalid choice: 'test'"),
    ([], "the following arguments are required: --out"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, expected):
    args = ["export-shapes", *(["--out", str(tmp_path / "out")] if argv else []), *argv]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert expected in line
    assert os.listdir(tmp_path) == []


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.json"
    target.write_text("{}")
    assert main(["export-shapes", "--out", str(target)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is a file" in line and target.read_text() == "{}"
