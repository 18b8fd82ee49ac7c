"""The one image reader: every Pillow mode to RGB in [0, 1], EXIF orientation, pixel limit, one-line errors.

The corpus is generated here, in the test's temp folder, with Pillow.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from rcnn_lab.data.images import MAX_PIXELS, ImageError, image_size, read_image
from rcnn_lab.errors import ConfigError

H, W = 6, 10


def gradient(dtype=np.uint8, top: int = 255) -> np.ndarray:
    """An ``[H, W]`` ramp from 0 to ``top`` (both reached)."""
    return (np.linspace(0, top, H * W).round().astype(dtype)).reshape(H, W)


def rgb_array() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def check(tensor: torch.Tensor, h: int = H, w: int = W) -> None:
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (3, h, w)
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0


def test_rgb_png_is_its_bytes_over_255(tmp_path):
    pixels = rgb_array()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    check(image)
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr"])
def test_eight_bit_modes_arrive_as_rgb_in_unit_range(tmp_path, mode):
    source = Image.fromarray(rgb_array())
    image = source.convert(mode)
    suffix = {"CMYK": ".jpg", "YCbCr": ".jpg"}.get(mode, ".png")
    if suffix == ".jpg":
        image.save(tmp_path / f"x{suffix}", quality=100)
    else:
        image.save(tmp_path / f"x{suffix}")
    out = read_image(tmp_path / f"x{suffix}")
    check(out)
    expected = np.asarray(Image.open(tmp_path / f"x{suffix}").convert("RGB"), np.float32) / 255
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))
    if mode in ("1", "L", "LA"):  # grey: three equal channels
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_rgba_keeps_colour_and_drops_alpha(tmp_path):
    pixels = np.zeros((H, W, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 200, 0  # fully transparent red
    Image.fromarray(pixels, "RGBA").save(tmp_path / "t.png")
    out = read_image(tmp_path / "t.png")
    assert torch.allclose(out[0], torch.full((H, W), 200 / 255)) and float(out[1:].abs().max()) == 0.0


def test_sixteen_bit_png_is_divided_by_65535(tmp_path):
    ramp = gradient(np.uint16, 65535)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really stored and read as 16-bit
    out = read_image(tmp_path / "deep.png")
    check(out)
    assert float(out.max()) == 1.0  # 65535 -> exactly 1.0 (not 257)
    assert float(out.min()) == 0.0
    assert torch.allclose(out[0], torch.from_numpy(ramp.astype(np.float32) / 65535))
    assert torch.equal(out[0], out[2])


def test_thirty_two_bit_integer_and_float_modes(tmp_path):
    ints = Image.fromarray(gradient(np.int32, 65535).astype(np.int32), "I")
    ints.save(tmp_path / "i.tif")
    out = read_image(tmp_path / "i.tif")
    check(out)
    assert float(out.max()) == 1.0
    big = np.full((H, W), 70000, np.int32)  # beyond 16 bits: clipped, never above 1
    Image.fromarray(big, "I").save(tmp_path / "big.tif")
    assert float(read_image(tmp_path / "big.tif").max()) == 1.0

    floats = np.linspace(-0.5, 1.5, H * W, dtype=np.float32).reshape(H, W)
    floats[0, 0] = np.nan
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif")
    check(out)
    assert float(out[0, 0, 0]) == 0.0  # NaN read as 0
    inside = (floats >= 0) & (floats <= 1)
    assert torch.allclose(out[1][torch.from_numpy(inside)], torch.from_numpy(floats[inside]))


def exif_jpeg(path, orientation: int) -> np.ndarray:
    """A JPEG stored W x H with the given EXIF orientation; returns the stored pixels."""
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[:, : W // 2] = 255  # left half white, right half black: orientation is visible
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    return pixels


def test_exif_orientation_is_applied(tmp_path):
    exif_jpeg(tmp_path / "r.jpg", 6)  # 6: rotate 90 degrees clockwise to display
    out = read_image(tmp_path / "r.jpg")
    check(out, W, H)  # sides exchanged
    assert image_size(tmp_path / "r.jpg") == (H, W)
    # rotated clockwise: the stored left (white) half is now the top
    assert float(out[:, : W // 2 - 1].mean()) > 0.9 and float(out[:, W // 2 + 1:].mean()) < 0.1

    exif_jpeg(tmp_path / "m.jpg", 2)  # 2: mirrored left-right, sides kept
    out = read_image(tmp_path / "m.jpg")
    check(out)
    assert image_size(tmp_path / "m.jpg") == (W, H)
    assert float(out[..., : W // 2 - 1].mean()) < 0.1 and float(out[..., W // 2 + 1:].mean()) > 0.9


def test_image_size_reads_the_header_only(tmp_path, monkeypatch):
    Image.fromarray(rgb_array()).save(tmp_path / "a.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    assert image_size(tmp_path / "a.png") == (W, H)


def test_truncated_file_is_one_line(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "t.jpg") == (64, 64)  # the header is intact
    with pytest.raises(ImageError) as info:
        read_image(tmp_path / "t.jpg")
    message = str(info.value)
    assert "\n" not in message and "t.jpg" in message and "cannot decode" in message and "replace or remove" in message
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2


@pytest.mark.parametrize("name,content,expected", [
    ("notes.jpg", b"this is text, not a JPEG\n" * 4, "not an image file"),
    ("empty.png", b"", "not an image file"),
    ("header.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),
])
def test_non_image_files_are_one_line(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    for reader in (read_image, image_size):
        with pytest.raises(ImageError) as info:
            reader(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and name in message and expected in message
        assert "Traceback" not in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="does not exist; check the path"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """A small file declaring many pixels: refused from the header, nothing decoded (bounded time and memory)."""
    side = 4000  # 16 M pixels of one colour: a PNG of a few kB
    Image.new("L", (side, side)).save(tmp_path / "bomb.png", optimize=True)
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    tracemalloc.start()
    start = time.perf_counter()
    for reader in (read_image, image_size):
        with pytest.raises(ImageError) as info:
            reader(tmp_path / "bomb.png", max_pixels=1_000_000)
        message = str(info.value)
        assert "bomb.png" in message and "4000x4000" in message and "over the limit of 1,000,000" in message
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20  # decoding would need 16 MB (uint8) / 192 MB (float RGB)
    assert time.perf_counter() - start < 5
    # under the limit the same file decodes
    assert tuple(read_image(tmp_path / "bomb.png", max_pixels=side * side).shape) == (3, side, side)


def test_default_limit_is_the_documented_one():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    assert f"{MAX_PIXELS:,}" in doc


def test_error_under_a_config_key(tmp_path):
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.raises(ImageError) as info:
        read_image(tmp_path / "x.jpg")
    moved = info.value.under("data.train.images")
    assert str(moved).count("data.train.images") == 1 and "x.jpg" in str(moved)


def test_coco_dataset_reads_a_sixteen_bit_png_in_unit_range(tmp_path, monkeypatch):
    """A 16-bit PNG reaches the model in [0, 1] through the COCO dataset (it used to reach 257)."""
    import json

    from rcnn_lab.data import coco_files
    from rcnn_lab.data.coco import CocoDataset

    monkeypatch.setattr(coco_files, "SAMPLE", 0)  # the build's header sample would refuse bad.png first (test_coco_files.py)

    (tmp_path / "images").mkdir()
    Image.fromarray(gradient(np.uint16, 65535)).save(tmp_path / "images" / "deep.png")
    (tmp_path / "images" / "bad.png").write_text("not a png")
    data = {"images": [{"id": 1, "file_name": "deep.png", "width": W, "height": H},
                       {"id": 2, "file_name": "bad.png", "width": W, "height": H}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 3], "area": 12, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    dataset = CocoDataset(tmp_path / "images", tmp_path / "ann.json", cache=False)
    image, target = dataset[0]
    check(image)
    assert float(image.max()) == 1.0 and float(image.min()) == 0.0
    assert target["boxes"].tolist() == [[1.0, 1.0, 5.0, 4.0]]
    with pytest.raises(ConfigError) as info:
        dataset[1]
    message = str(info.value)
    assert "\n" not in message and "images: " in message and "bad.png" in message and "or remove it" in message
