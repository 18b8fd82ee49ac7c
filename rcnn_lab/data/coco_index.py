"""The index of a COCO dataset held in a few numpy buffers, not in per-image lists of dicts.

A DataLoader worker is a fork of the main process: pages are shared until written. Python
objects are written whenever they are read (reference counts, the garbage collector's
headers), so a worker touching per-image lists of annotation dicts slowly copies the whole
index (~1 GB per worker on COCO train2017). Here the index is a handful of arrays: each
image's id, size and file name, and its annotations' JSON objects (exactly as in the file,
joined by commas and grouped by image) plus their boxes and crowd flags. Reading an item
decodes one image's annotations from the buffer; no page of the index is ever written.
detectron2 does the same with ``DatasetFromList(serialize=True)`` (pickled dicts in one
numpy buffer).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

_FAST_DECODE = msgspec.json.Decoder().decode  # JSON objects -> dicts, as json.loads gives them


@dataclass(frozen=True)
class CocoIndex:
    """Images sorted by id and their annotations (file order within an image), as arrays.

    ``strict_json``: the annotation buffer is standard JSON (decoded with msgspec); False when
    it was re-encoded by ``json.dumps`` from a file using NaN/Infinity (decoded with ``json``).
    """

    image_ids: np.ndarray  # int64 [n], increasing
    widths: np.ndarray  # int64 [n]
    heights: np.ndarray  # int64 [n]
    names: np.ndarray  # uint8: UTF-8 file names, concatenated
    name_offsets: np.ndarray  # int64 [n + 1]
    ann_offsets: np.ndarray  # int64 [n + 1]: image i has annotation rows ann_offsets[i]:ann_offsets[i + 1]
    ann_json: np.ndarray  # uint8: the annotations' JSON objects joined by commas, grouped by image
    ann_json_offsets: np.ndarray  # int64 [m + 1]: where annotation k's object starts (k = m: length + 1)
    boxes: np.ndarray  # float64 [m, 4]: bbox [x, y, width, height] as in the file
    crowd: np.ndarray  # bool [m]: iscrowd is truthy
    strict_json: bool = True

    @classmethod
    def build(cls, image_ids: Sequence[int], widths: Sequence[int], heights: Sequence[int], names: Sequence[str],
              ann_images: np.ndarray, ann_raws: Sequence, boxes: np.ndarray, crowd: np.ndarray,
              strict_json: bool = True) -> CocoIndex:
        """Index images (any order, unique ids) and annotations (``ann_images[k]``: position of
        annotation ``k``'s image in ``image_ids``; ``ann_raws[k]``: its JSON object as bytes)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        by_id = np.argsort(ids, kind="stable")
        rank = np.empty_like(by_id)
        rank[by_id] = np.arange(len(ids))
        encoded = [names[i].encode("utf-8", "surrogatepass") for i in by_id.tolist()]
        name_offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=name_offsets[1:])
        names_buf = np.frombuffer(b"".join(encoded), np.uint8)
        del encoded

        rows = rank[np.asarray(ann_images, dtype=np.int64)] if len(ann_raws) else np.zeros(0, np.int64)
        order = np.argsort(rows, kind="stable")
        ann_offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=len(ids)), out=ann_offsets[1:])
        order_list = order.tolist()
        lengths = np.fromiter((len(memoryview(ann_raws[k])) + 1 for k in order_list), np.int64, len(order_list))
        json_offsets = np.zeros(len(order_list) + 1, np.int64)
        np.cumsum(lengths, out=json_offsets[1:])
        ann_json = np.frombuffer(b",".join([ann_raws[k] for k in order_list]), np.uint8)
        return cls(ids[by_id], np.asarray(widths, np.int64)[by_id], np.asarray(heights, np.int64)[by_id], names_buf,
                   name_offsets, ann_offsets, ann_json, json_offsets, np.asarray(boxes, np.float64).reshape(-1, 4)[order],
                   np.asarray(crowd, bool)[order], strict_json)

    @classmethod
    def from_dicts(cls, images: Sequence[dict], per_image: dict[int, list[dict]]) -> CocoIndex:
        """Index checked image dicts and their annotation dicts (``per_image[image id]``)."""
        pos = {img["id"]: i for i, img in enumerate(images)}
        anns = [(pos[image_id], ann) for image_id, group in per_image.items() for ann in group]
        strict = all(_finite(ann) for _, ann in anns)
        encode = msgspec.json.encode if strict else (lambda a: json.dumps(a, separators=(",", ":")).encode())
        return cls.build([img["id"] for img in images], [img["width"] for img in images], [img["height"] for img in images],
                         [img["file_name"] for img in images], np.array([p for p, _ in anns], np.int64),
                         [encode(ann) for _, ann in anns], np.array([ann["bbox"] for _, ann in anns], np.float64),
                         np.array([bool(ann.get("iscrowd", 0)) for _, ann in anns], bool), strict)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_annotations(self) -> int:
        return len(self.crowd)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's arrays."""
        return sum(getattr(self, f).nbytes for f in self.__dataclass_fields__ if isinstance(getattr(self, f), np.ndarray))

    def problem(self) -> str | None:
        """Why the arrays cannot be one index (dtypes, lengths, offsets that do not fit), or None.
        Cheap (reads a few elements): checks an index loaded from the cache."""
        n, m = len(self.image_ids), len(self.crowd)
        i8, u1 = np.dtype(np.int64), np.dtype(np.uint8)
        expect = {"image_ids": (i8, (n,)), "widths": (i8, (n,)), "heights": (i8, (n,)), "names": (u1, None),
                  "name_offsets": (i8, (n + 1,)), "ann_offsets": (i8, (n + 1,)), "ann_json": (u1, None),
                  "ann_json_offsets": (i8, (m + 1,)), "boxes": (np.dtype(np.float64), (m, 4)), "crowd": (np.dtype(bool), (m,))}
        for name, (dtype, shape) in expect.items():
            array = getattr(self, name)
            if array.dtype != dtype or (array.shape != shape if shape else array.ndim != 1):
                return f"{name} is {array.dtype} {list(array.shape)}, expected {dtype} {list(shape) if shape else '[k]'}"
        ends = {"name_offsets": (self.name_offsets, len(self.names)), "ann_offsets": (self.ann_offsets, m),
                "ann_json_offsets": (self.ann_json_offsets, len(self.ann_json) + 1 if m else 0)}
        for name, (offsets, end) in ends.items():
            if offsets[0] != 0 or offsets[-1] != end:
                return f"{name} runs from {offsets[0]} to {offsets[-1]}, expected 0 to {end}"
        return None

    def file_name(self, row: int) -> str:
        return self.names[self.name_offsets[row]:self.name_offsets[row + 1]].tobytes().decode("utf-8", "surrogatepass")

    def image(self, row: int) -> dict:
        """``{id, file_name, width, height}`` of image ``row``."""
        return {"id": int(self.image_ids[row]), "file_name": self.file_name(row),
                "width": int(self.widths[row]), "height": int(self.heights[row])}

    def annotations(self, row: int) -> list[dict]:
        """Image ``row``'s annotations as the file holds them (dicts, file order)."""
        first, last = self.ann_offsets[row], self.ann_offsets[row + 1]
        if first == last:
            return []
        text = b"[" + self.ann_json[self.ann_json_offsets[first]:self.ann_json_offsets[last] - 1].tobytes() + b"]"
        return _FAST_DECODE(text) if self.strict_json else json.loads(text)

    def annotation_images(self) -> np.ndarray:
        """Image row of every annotation row (int64 [m])."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.ann_offsets))


def _finite(ann: dict) -> bool:
    """True when ``ann`` holds no NaN/Infinity (which standard JSON, and msgspec, cannot hold)."""
    try:
        msgspec.json.decode(json.dumps(ann, allow_nan=False))
    except (ValueError, msgspec.DecodeError):
        return False
    return True


class Progress:
    """One line per build phase on stderr (``enabled``), with the phase's wall time."""

    def __init__(self, name: str, enabled: bool, write: Callable[[str], object] | None = None):
        self.name, self.enabled = name, enabled
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.tick = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            self.write(f"rcnn-lab: {self.name}: {message} ({now - self.tick:.1f} s)")
        self.tick = now
