"""The predict engine: finding images, checking --out, the streamed results file, pictures, unreadable images."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rcnn_lab.engine.evaluate import detections_to_coco
from rcnn_lab.engine.predict import ImageInput, ResultsWriter, check_out, find_images, predict_images
from rcnn_lab.errors import ConfigError
from tests.conftest import TINY_MODEL

CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]


def rgb(path, h=40, w=60, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# --- finding images -------------------------------------------------------------------------------

def test_find_images_in_files_and_folders(tmp_path):
    (tmp_path / "f" / "sub").mkdir(parents=True)
    rgb(tmp_path / "f" / "b.PNG")
    rgb(tmp_path / "f" / "sub" / "a.jpg")
    rgb(tmp_path / "f" / "sub" / "b.jpeg")  # same stem as f/b.PNG in another folder: different names
    (tmp_path / "f" / "notes.txt").write_text("x")  # in a folder: not an image suffix, ignored
    (tmp_path / "f" / ".hidden.jpg").write_text("x")
    rgb(tmp_path / "one.jpg")
    rgb(tmp_path / "f2.jpg")
    items = find_images([str(tmp_path / "f"), str(tmp_path / "one.jpg"), str(tmp_path / "f" / "b.PNG")])
    assert [i.name for i in items] == ["b", "sub/a", "sub/b", "one", "b-2"]
    assert items[0].path == tmp_path / "f" / "b.PNG" and items[-1].path == tmp_path / "f" / "b.PNG"
    (tmp_path / "f" / "preds" / "images").mkdir(parents=True)
    rgb(tmp_path / "f" / "preds" / "images" / "b.png")  # an earlier run's picture, --out inside the folder
    assert [i.name for i in find_images([str(tmp_path / "f")], exclude=tmp_path / "f" / "preds")] == ["b", "sub/a", "sub/b"]


def test_find_images_reports_every_problem_in_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError) as info:
        find_images([str(tmp_path / "empty"), str(tmp_path / "docs"), str(tmp_path / "notes.txt"),
                     str(tmp_path / "missing.jpg")])
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and all(line.startswith("IMAGES: ") for line in lines)
    assert "holds no image file" in lines[0] and "holds no image file" in lines[1]
    assert "not an image file" in lines[2] and "does not exist; check the path" in lines[3]


def test_check_out_creates_nothing_and_refuses_files(tmp_path):
    assert check_out(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out: .*is a file; name a folder"):
        check_out(tmp_path / "file")
    with pytest.raises(ConfigError, match="--out: .*is a file, so .* cannot be created"):
        check_out(tmp_path / "file" / "below")


def test_check_out_refuses_an_unwritable_folder(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    # root may write anywhere: the permission answer is simulated for this folder
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real(path, mode))
    with pytest.raises(ConfigError, match="--out: .*locked is not writable; name a folder you can write to"):
        check_out(locked / "out")
    assert not (locked / "out").exists()


def test_results_writer_is_valid_json_when_empty_and_after_an_interruption(tmp_path):
    with ResultsWriter(tmp_path / "r.json"):
        pass
    assert json.loads((tmp_path / "r.json").read_text()) == []
    with pytest.raises(KeyboardInterrupt), ResultsWriter(tmp_path / "r.json") as writer:
        writer.write([{"a": 1}, {"a": 2}])
        writer.write([])
        writer.write([{"a": 3}])
        raise KeyboardInterrupt
    assert json.loads((tmp_path / "r.json").read_text()) == [{"a": 1}, {"a": 2}, {"a": 3}]


# --- predicting -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tests' tiny Mask R-CNN (2 categories), seeded, with every box kept (random weights score low)."""
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.models.builder import build_model

    path = tmp_path_factory.mktemp("exp") / "tiny.yaml"
    path.write_text(f"name: tiny\n{TINY_MODEL}")
    config = load_experiment(path, ["model.num_classes=3", "model.roi_heads.score_thresh=0.0"]).variants[0].config
    torch.manual_seed(0)
    return build_model(config.model).eval()


def test_predictions_equal_the_model_outputs_above_the_score(tmp_path, tiny_model):
    """Raising the model's score threshold to --score changes no detection above it (and the file holds them all)."""
    paths = [rgb(tmp_path / "a.png", 40, 60, 1), rgb(tmp_path / "b.png", 50, 30, 2), rgb(tmp_path / "c.png", 64, 64, 3)]
    items = [ImageInput(p, p.stem) for p in paths]
    with torch.inference_mode():
        outputs = tiny_model([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255).permute(2, 0, 1) for p in paths])
    scores = torch.cat([o["scores"] for o in outputs])
    score = float(scores.median())  # half of the detections are below it
    expected = [r for r in detections_to_coco(outputs, [1, 2, 3], CATEGORIES) if r["score"] >= score]
    summary = predict_images(tiny_model, items, tmp_path / "out", CATEGORIES, torch.device("cpu"), batch_size=2,
                             score=score)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0 < len(written) == len(expected) == summary.detections
    assert tiny_model.roi_heads.score_thresh == 0.0  # restored
    for got, want in zip(written, expected):
        assert got["image_id"] == want["image_id"] and got["category_id"] == want["category_id"]
        assert got["file_name"] == items[got["image_id"] - 1].shown
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3) and got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["segmentation"]["size"] == want["segmentation"]["size"]
    for p in paths:  # one picture per image, its size
        picture = Image.open(tmp_path / "out" / "images" / f"{p.stem}.png")
        assert picture.size == Image.open(p).size and picture.mode == "RGB"


def test_unusual_images_are_predicted_and_a_corrupt_one_is_skipped(tmp_path, tiny_model, capsys):
    deep = tmp_path / "deep.png"
    Image.fromarray(np.linspace(0, 65535, 30 * 40).astype(np.uint16).reshape(30, 40)).save(deep)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 40 x 30 stored, 30 x 40 shown
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(rotated, exif=exif)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((20, 20, 4), 200, np.uint8), "RGBA").save(rgba)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items = [ImageInput(p, p.stem) for p in (deep, broken, rotated, rgba)]
    summary = predict_images(tiny_model, items, tmp_path / "out", CATEGORIES, torch.device("cpu"), batch_size=3,
                             score=0.0)
    out, err = capsys.readouterr()
    assert summary.images == 3 and len(summary.failed) == 1
    assert err.count("\n") == 1 and "broken.jpg" in err and err.startswith("skipped: ")
    assert [line.split(":")[0] for line in out.splitlines()] == [items[i].shown for i in (0, 2, 3)]
    assert Image.open(tmp_path / "out" / "images" / "rotated.png").size == (30, 40)  # EXIF applied
    assert not (tmp_path / "out" / "images" / "broken.png").exists()
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["image_id"] for r in written} <= {1, 3, 4} and written


class FixedDetector(nn.Module):
    """Twenty detections with masks per image, whatever the image (no network): the file's content is known."""

    def forward(self, images):
        outs = []
        for image in images:
            h, w = image.shape[-2:]
            n = 20
            boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2]]).repeat(n, 1)
            masks = torch.zeros((n, 1, h, w))
            masks[:, :, : h // 2, : w // 2] = 1.0
            outs.append({"boxes": boxes, "scores": torch.linspace(0.99, 0.6, n), "labels": torch.ones(n, dtype=torch.int64),
                         "masks": masks})
        return outs


def test_results_stream_to_disk_and_memory_stays_flat(tmp_path):
    """Each batch's detections are on disk before the next batch runs, and memory does not grow with the image count."""
    path = rgb(tmp_path / "x.png", 16, 16)
    results = tmp_path / "out" / "results.json"

    class Watching(FixedDetector):
        seen = []

        def forward(self, images):  # the file as it stands before this batch
            if results.exists():
                Watching.seen.append(results.read_text().count('"image_id"'))
            return super().forward(images)

    predict_images(Watching(), [ImageInput(path, f"x{i}") for i in range(5)], tmp_path / "out", CATEGORIES,
                   torch.device("cpu"), batch_size=1, draw=False)
    assert Watching.seen == [0, 20, 40, 60, 80]  # written as it goes, not at the end
    assert len(json.loads(results.read_text())) == 100

    def peak(count: int) -> int:
        items = [ImageInput(path, f"x{i}") for i in range(count)]
        tracemalloc.start()
        predict_images(FixedDetector(), items, tmp_path / f"out{count}", CATEGORIES, torch.device("cpu"), batch_size=4,
                       draw=False)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(json.loads((tmp_path / f"out{count}" / "results.json").read_text())) == 20 * count
        return top

    small, large = peak(40), peak(400)
    held = (tmp_path / "out400" / "results.json").stat().st_size  # what a list of all results would hold, at least
    assert held > 1_000_000
    assert large - small < 200_000 < held / 5


def test_pictures_from_the_masks_at_hand_equal_pictures_from_the_rle(tmp_path):
    """predict hands draw_detections the masks it has; the picture is the one the RLE in the file gives."""
    from rcnn_lab.engine.gallery import draw_detections

    image = torch.from_numpy(np.random.default_rng(0).random((3, 40, 60), dtype=np.float32))
    output = FixedDetector()([image])[0]
    output["scores"] = torch.tensor([0.9, 0.3] + [0.6] * 18)
    output["masks"][1, :, 20:, 30:] = 1.0  # a second shape, below the score
    results = detections_to_coco([output], [1], CATEGORIES)
    masks = output["masks"][:, 0] > 0.5
    from_rle = draw_detections(image, results, CATEGORIES, 0.5)
    assert torch.equal(draw_detections(image, results, CATEGORIES, 0.5, masks=masks), from_rle)
    assert not torch.equal(from_rle, draw_detections(image, results, CATEGORIES, 0.0))  # the low one is drawn at 0
    assert torch.equal(draw_detections(image, results, CATEGORIES, 0.95, masks=masks),
                       (image * 255).round().to(torch.uint8))  # nothing above: the image itself


def test_foreign_tensors_are_extra_parts_inside_the_model_not_parts_it_leaves_out():
    from rcnn_lab.engine.weights import foreign_tensors

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.box = nn.Linear(2, 2)
            self.mask_head = None  # a part this model leaves out (a Faster R-CNN's)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(2, 2))
            self.roi_heads = Heads()

    names = ["roi_heads.mask_head.0.weight", "body.1.weight", "roi_heads.box.extra", "neck.weight"]
    assert foreign_tensors(Model(), names) == ["body.1.weight", "roi_heads.box.extra", "neck.weight"]


def test_progress_bar_keeps_the_per_image_lines_on_stdout(tmp_path, capsys):
    path = rgb(tmp_path / "x.png", 16, 16)
    predict_images(FixedDetector(), [ImageInput(path, f"x{i}") for i in range(3)], tmp_path / "out", CATEGORIES,
                   torch.device("cpu"), batch_size=2, draw=False, progress=True)
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{ImageInput(path, 'x').shown}: 20 detections (20 circle)"] * 3
    assert "predict" in err and "3/3" in err
