"""A corpus of bad COCO files and image files, written on demand (nothing binary is committed).

``write_case(folder, case)`` writes ``folder/images/``, ``folder/annotations.json`` and
``folder/exp.yaml`` (an experiment training and validating on them) for one ``Case``: a sound
two-image set with one edit. ``python -m tests.data.bad_data OUT`` writes every case under OUT.
Used by tests/cli/test_bad_data.py (each case: exit 2, one line naming the file, the entry and the
fix, nothing written, bounded time and memory).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SIZES = {"a.png": (24, 32), "b.png": (32, 24)}  # (height, width)


def sound() -> dict:
    """Two images, a polygon, a compressed RLE (a 4x4 square at 2,2 of b.png) and an uncompressed one."""
    import numpy as np
    from pycocotools import mask as mask_utils

    square = np.zeros((32, 24), np.uint8, order="F")
    square[2:6, 2:6] = 1
    counts = mask_utils.encode(square)["counts"].decode()
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 24, "width": 32},
                   {"id": 2, "file_name": "b.png", "height": 32, "width": 24}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0,
             "segmentation": {"size": [32, 24], "counts": counts}},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, 4, 4], "area": 16, "iscrowd": 1,
             "segmentation": {"size": [32, 24], "counts": [10 * 32 + 10, 4, 28, 4, 28, 4, 28, 4, 32 * 24 - 10 * 32 - 10 - 16 - 84]}},
        ],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "unused"}],
    }


@dataclass
class Case:
    id: str
    edit: Callable[[dict], object] = lambda data: None  # changes the JSON data
    expect: tuple[str, ...] = ()  # substrings of the one error line (besides the file, which every case checks)
    text: Callable[[str], str] | None = None  # changes the JSON text (for what json.dumps cannot write)
    files: Callable[[Path], object] | None = None  # changes the images folder
    dataset: dict = field(default_factory=dict)  # extra data.train keys
    file: str = "annotations.json"  # the file the line names
    deep: bool = False  # found by validate --data --deep only
    crash: bool = False  # crashed or exhausted memory before the checks: also run under a memory cap
    indexed: bool = False  # the JSON passes its own checks (the problem is found against the images folder)


def _ann(k: int, key: str, value) -> Callable[[dict], None]:
    def edit(data):
        data["annotations"][k][key] = value
    return edit


def _corrupt(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda images: (images / name).write_bytes(content)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _bomb(images: Path) -> None:
    from PIL import Image

    Image.new("1", (20000, 20000)).save(images / "a.png")  # ~50 KB, 400 M pixels


def _png(name: str, height: int, width: int) -> Callable[[Path], None]:
    def write(images):
        from PIL import Image

        Image.new("RGB", (width, height)).save(images / name)
    return write


CASES = [
    Case("nan-polygon", lambda d: d["annotations"][0]["segmentation"][0].__setitem__(3, float("nan")),
         ("annotations[0].segmentation[0][3]: is nan", "coordinates must be finite", "fix"), crash=True),
    Case("inf-polygon", text=lambda t: t.replace("[[2, 2, 12, 2,", "[[2, 2, 1e999, 2,"),
         expect=("annotations[0].segmentation[0][2]: is inf",), crash=True),
    Case("far-polygon", lambda d: d["annotations"][0]["segmentation"][0].__setitem__(0, -5e7),
         ("annotations[0].segmentation[0][0]: is -50000000.0, beyond +-1,000,000",), crash=True),
    Case("long-outline", lambda d: d["annotations"][0].__setitem__("segmentation", [[0, 0, 9e5, 0, 0, 9e5, 9e5, 9e5] * 4]),
         ("annotations[0].segmentation[0]: outline of", "over the limit of 16,777,216"), crash=True),
    Case("nan-bbox", _ann(1, "bbox", [2, 2, float("nan"), 4]), ("annotations[1].bbox[2]: is nan",)),
    Case("inf-bbox", text=lambda t: t.replace('"bbox": [10, 10, 4, 4]', '"bbox": [10, 10, Infinity, 4]'),
         expect=("annotations[2].bbox[2]: is inf",)),
    Case("negative-box", _ann(1, "bbox", [2, 2, -4, 4]), ("annotations[1].bbox:", "negative width or height")),
    # an area sorts the ground truth into COCOeval's size ranges: NaN would count in all three
    Case("nan-area", _ann(1, "area", float("nan")), ("annotations[1].area: is nan", "leave it out")),
    Case("negative-area", _ann(2, "area", -16), ("annotations[2].area: is -16", "finite number >= 0")),
    Case("text-area", _ann(0, "area", "80"), ("annotations[0].area: is '80'", "finite number >= 0")),
    Case("area-beyond-float", _ann(0, "area", 10**400), ("annotations[0].area: is 1000", "finite number >= 0")),
    Case("duplicate-annotation-id", _ann(2, "id", 1), ("annotations[2].id: 1 is also the id of annotations[0]",)),
    Case("id-2-to-the-64", lambda d: d["images"][1].__setitem__("id", 2**64),
         ("images[1].id: 18446744073709551616 does not fit in 64 bits",)),
    Case("id-5000-digits", text=lambda t: t.replace('"id": 2, "file_name"', '"id": ' + "7" * 5000 + ', "file_name"'),
         expect=("images[1].id: a 5,000-digit integer does not fit in 64 bits",)),
    Case("nested-100000", text=lambda t: t.replace('"segmentation": [[2, 2,', '"segmentation": ' + "[" * 100_000
                                                      + "]" * 100_000 + ', "x": [[2, 2,'),
         expect=("annotations[0].segmentation: nests deeper than 32 levels",), crash=True),
    Case("rle-does-not-decode", lambda d: d["annotations"][1]["segmentation"].__setitem__("counts", "0000"),
         ("annotations[1].segmentation: RLE runs cover 0 pixels, the image has 32x24 = 768",), crash=True),
    Case("rle-overruns-the-mask", lambda d: d["annotations"][2]["segmentation"].__setitem__("counts", [700, 10**6]),
         ("annotations[2].segmentation: RLE runs cover 1,000,700 pixels",), crash=True),
    Case("rle-bad-characters", lambda d: d["annotations"][1]["segmentation"].__setitem__("counts", "a b"),
         ("annotations[1].segmentation: RLE counts holds characters outside",), crash=True),
    Case("declared-20000-squared", lambda d: d["images"][0].update(width=20000, height=20000),
         ("images[0]: width x height is 20,000 x 20,000 = 400,000,000 pixels, over the limit",), crash=True),
    Case("absolute-file-name", lambda d: d["images"][0].__setitem__("file_name", "/etc/hostname"),
         ("images[0].file_name: '/etc/hostname' is an absolute path",)),
    Case("file-name-is-a-folder", lambda d: d["images"][0].__setitem__("file_name", "sub"),
         expect=("image id 1: file_name 'sub' names a folder",), files=lambda images: (images / "sub").mkdir(), indexed=True),
    Case("empty-after-filtering", dataset={"category_ids": [2], "remove_images_without_annotations": True},
         expect=("data.train.remove_images_without_annotations: leaves none of the 2 images",
                 "set remove_images_without_annotations: false"), file="exp.yaml"),
    Case("missing-image", files=lambda images: (images / "b.png").unlink(),
         expect=("data.train.images: 1 image file(s) listed in", "missing", "b.png"), file="exp.yaml"),
    Case("corrupt-image", files=lambda images: _png("b.png", 32, 24)(images) or _truncate(images / "b.png", 20),
         expect=("data.train.images: corrupt image header", "image id 2"), file="images/b.png"),
    Case("not-an-image", files=_corrupt("a.png", b"GIF? no: plain text"),
         expect=("data.train.images: not an image file Pillow can read", "image id 1"), file="images/a.png"),
    Case("size-differs", files=_png("b.png", 30, 24),
         expect=("data.train.images: ", "b.png' is 24x30 (WxH) but", "says 24x32 for image id 2"), file="exp.yaml"),
    Case("decompression-bomb", files=_bomb, expect=("data.train.images: image is over the pixel limit",),
         file="images/a.png", crash=True),
    Case("annotations-is-a-folder", text=lambda t: t, dataset={"annotations": "images"},
         expect=("data.train.annotations: 'images' is a folder, not a file",), file="exp.yaml"),
]


def write_case(folder: Path, case: Case) -> Path:
    """Write one case's files under ``folder``; returns the experiment file."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    for name, (h, w) in SIZES.items():
        Image.new("RGB", (w, h), (90, 120, 150)).save(images / name)
    data = sound()
    case.edit(data)
    text = json.dumps(data)
    if case.text is not None:
        text = case.text(text)
    (folder / "annotations.json").write_text(text)
    if case.files is not None:
        case.files(images)
    spec = {"type": "coco", "images": "images", "annotations": "annotations.json", **case.dataset}
    exp = folder / "exp.yaml"
    exp.write_text("name: bad_data\nmodel: {num_classes: 3}\ntrain: {device: cpu, iterations: 2}\n"
                   f"data: {{train: {json.dumps(spec)}, val: {json.dumps(spec)}, batch_size: 1}}\n")
    return exp


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for c in CASES:
        write_case(out / c.id, c)
    print(f"wrote {len(CASES)} cases under {out}")
