"""The image files a COCO set lists: existence and folders every build, a sample's headers, every header on request (cached)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rcnn_lab.data import coco_files
from rcnn_lab.data.coco import CocoDataset
from rcnn_lab.data.export import write_png
from rcnn_lab.errors import ConfigError
from tests.data.test_coco import tiny  # noqa: F401  (fixture)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RCNN_LAB_CACHE", str(root))
    return root


def _error(root, ann, **kwargs) -> str:
    with pytest.raises(ConfigError) as exc:
        CocoDataset(root, ann, **kwargs)
    return str(exc.value)


def test_a_file_name_that_is_a_folder_is_named(tiny):  # noqa: F811
    root, ann, data = tiny
    data["images"][2]["file_name"] = "sub"
    ann.write_text(json.dumps(data))
    assert "image id 12: file_name 'sub' names a folder" in _error(root, ann)


def test_every_build_reads_a_samples_headers(tiny):  # noqa: F811
    root, ann, _ = tiny
    (root / "b.png").write_bytes(b"not an image at all")
    message = _error(root, ann)
    assert "b.png: images: not an image file Pillow can read" in message and "image id 11" in message
    write_png(torch.zeros((3, 7, 9), dtype=torch.uint8), root / "b.png")
    assert "b.png' is 9x7 (WxH) but" in _error(root, ann) and "says 20x30 for image id 11" in _error(root, ann)


def test_a_decompression_bomb_is_one_line_naming_the_file(tiny):  # noqa: F811
    from PIL import Image

    root, ann, _ = tiny
    Image.new("1", (20000, 20000)).save(root / "a.png")  # 1-bit: a small file, 400 M pixels
    assert (root / "a.png").stat().st_size < 200_000
    (line,) = _error(root, ann).splitlines()
    assert line.startswith(f"{root / 'a.png'}: images: image is over the pixel limit") and "image id 10" in line


def test_only_the_sample_is_read_by_default(tiny, monkeypatch):  # noqa: F811
    root, ann, _ = tiny
    monkeypatch.setattr(coco_files, "SAMPLE", 1)
    (root / "b.png").write_bytes(b"garbage")  # the middle image: not in a sample of one (the first)
    ds = CocoDataset(root, ann)
    with pytest.raises(ConfigError, match="b.png: images: not an image file"):
        ds.check_images(progress=False)


def test_deep_check_remembers_the_files_that_passed(tiny, cache_root, monkeypatch):  # noqa: F811
    root, ann, _ = tiny
    ds = CocoDataset(root, ann)
    first = ds.check_images(progress=False)
    assert (first.images, first.cached) == (3, 0)
    read = []
    real = coco_files.image_size
    monkeypatch.setattr(coco_files, "image_size", lambda path: read.append(os.path.basename(path)) or real(path))
    ds = CocoDataset(root, ann)
    read.clear()  # the build's sample
    again = ds.check_images(progress=False)
    assert (again.images, again.cached, read) == (3, 3, [])
    write_png(torch.zeros((3, 16, 16), dtype=torch.uint8), root / "sub" / "c.png")  # same size, new mtime
    os.utime(root / "sub" / "c.png", ns=(1, 1))
    ds = CocoDataset(root, ann)
    read.clear()
    assert ds.check_images(progress=False).cached == 2 and read == ["c.png"]
    write_png(torch.zeros((3, 5, 5), dtype=torch.uint8), root / "sub" / "c.png")  # a problem now: read, reported
    monkeypatch.setattr(coco_files, "SAMPLE", 0)  # the build's sample would find it first
    with pytest.raises(ConfigError, match="c.png' is 5x5"):
        CocoDataset(root, ann).check_images(progress=False)
    with pytest.raises(ConfigError, match="c.png' is 5x5"):  # still reported: a file that failed is not remembered
        CocoDataset(root, ann).check_images(progress=False)
    assert sorted(p.name for p in (cache_root / "image-headers").iterdir() if p.is_dir()) != []


def test_deep_check_lists_a_few_problems_and_counts_the_rest(tmp_path, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    images = [{"id": i, "file_name": f"{i}.png", "width": 4, "height": 4} for i in range(12)]
    for img in images:
        (root / img["file_name"]).write_bytes(b"broken")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    monkeypatch.setattr(coco_files, "SAMPLE", 0)
    with pytest.raises(ConfigError) as exc:
        CocoDataset(root, ann).check_images(progress=False)
    lines = str(exc.value).splitlines()
    assert len(lines) == 9 and lines[-1].endswith("... and 4 more image problems")
