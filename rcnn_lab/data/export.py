"""Export a synthetic shapes split as ``images/*.png`` plus a COCO ``annotations.json``.

The export is atomic: files are written to a hidden temporary folder next to ``out_dir`` and
renamed into place at the end, so an interrupted export leaves no half-written dataset. The result
loads with the ``coco`` dataset (``images: OUT/images``, ``annotations: OUT/annotations.json``)
and gives the same images, boxes, labels and masks as the ``shapes`` dataset it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from rcnn_lab.data.shapes import ShapesDataset
from rcnn_lab.errors import ConfigError, Problem, display_path


def write_png(image: torch.Tensor, path: str | Path) -> None:
    """Write a uint8 ``[3, H, W]`` tensor as PNG (torchvision.io, quietly; PIL where that is unavailable)."""
    try:
        from torchvision.io import write_png as tv_write_png
    except ImportError:  # removed in a future torchvision
        tv_write_png = None
    if tv_write_png is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            tv_write_png(image, str(path))
        return
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format="PNG")


def _scratch(parent: Path, name: str, tag: str) -> Path:
    return parent / f".{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def export_shapes(
    out_dir: str | Path,
    split: str = "train",
    num_images: int = 64,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    **shapes_kwargs: Any,
) -> Path:
    """Write a shapes split to ``out_dir`` (``images/NNNNNN.png``, ``annotations.json``); return its path.

    Args:
        out_dir: destination folder; must be new or empty unless ``overwrite``.
        split, num_images, image_size, seed: as for the ``shapes`` dataset.
        overwrite: replace an existing non-empty ``out_dir`` (swapped in only once complete).
        **shapes_kwargs: any other ``shapes`` argument (``classes``, ``max_objects``, ``noise``...).

    Segmentations are compressed RLE; ``info.params`` records the generation parameters.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([Problem("--out", f"'{display_path(out)}' is a file; choose a folder path")])
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError([Problem("--out", f"'{display_path(out)}' is not empty; choose a new folder or pass "
                                   "--overwrite (overwrite=True) to replace it")])
    shapes_kwargs.pop("cache", None)
    dataset = ShapesDataset(split=split, num_images=num_images, image_size=image_size, seed=seed, cache=False,
                            **{k: tuple(v) if k == "classes" else v for k, v in shapes_kwargs.items()})

    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(parent, out.name, "tmp")
    tmp.mkdir()
    try:
        (tmp / "images").mkdir()
        data = dataset.coco_header()
        for index in range(len(dataset)):
            sample = dataset.sample(index)
            image, annotations = dataset.coco_record(index, len(data["annotations"]) + 1, sample)
            write_png(torch.from_numpy(sample.image), str(tmp / "images" / image["file_name"]))
            data["images"].append(image)
            data["annotations"].extend(annotations)
        with (tmp / "annotations.json").open("w") as f:
            json.dump(data, f, separators=(",", ":"))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing an existing ``out`` only once ``tmp`` is in place."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = _scratch(out.absolute().parent, out.name, "old")
            os.rename(out, old)
        else:
            out.rmdir()
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
