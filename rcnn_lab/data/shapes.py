"""Synthetic shapes: a deterministic instance-segmentation dataset drawn with vectorised numpy.

Image ``index`` of a split is a pure function of ``(seed, split, index)`` and the drawing
parameters: its random stream is ``numpy.random.SeedSequence([seed, split_id, index])``, so train
and val never share a stream and a smaller ``num_images`` gives a prefix of a larger one.

Each image is a textured background (base colour, smooth low-frequency texture, a ramp and faint
stripes) with shapes painted back to front, then per-pixel noise (triangular distribution,
standard deviation ``noise``), quantised to uint8 (so a dataset image equals its exported PNG).
Shapes are filled by implicit equations on coordinate grids (circles, ellipses, rings),
intersections of half-planes (regular polygons) or half-plane counts (the star), evaluated only
in each shape's bounding window.

Occlusion: later shapes cover earlier ones. Masks are the *visible* parts and boxes are the tight
boxes of those masks (``x1 = last column + 1``, the COCO convention). A new shape is re-drawn
elsewhere when it would leave an earlier instance with less than ``min_visible`` of its own area
(or fewer than ``MIN_PIXELS`` pixels); such instances are therefore never created, and every shape
pixel in an image belongs to an annotated instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from rcnn_lab.config.types import Bound
from rcnn_lab.data.limits import MAX_IMAGE_SIZE, MAX_IMAGES
from rcnn_lab.errors import ConfigError, Problem, did_you_mean
from rcnn_lab.registry import DATASETS

SPLITS = {"train": 0, "val": 1}
SHAPE_KINDS = ("circle", "square", "triangle", "ellipse", "pentagon", "hexagon", "star", "ring", "cross")
DEFAULT_CLASSES = ("circle", "square", "triangle", "ellipse", "star")  # model.num_classes: 6
MIN_PIXELS = 8  # absolute floor on an instance's visible pixels
_POLYGON_SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
_TRIES_PER_OBJECT = 20  # placement attempts per requested shape before giving up on it
_TEXTURE_GRID = 6  # control points per side of the smooth background texture
_MIN_CONTRAST = 0.3  # minimum RGB distance between a shape's colour and the background's base colour
_TRIANGULAR_STD = math.sqrt(2 * (256**2 - 1) / 12)  # std of the sum of two uniform bytes


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: kind, centre in pixels, circumscribed radius, rotation (radians) and a shape parameter.

    ``param`` is the minor/major axis ratio of an ellipse and the inner/outer radius ratio of a
    ring; other kinds ignore it.
    """

    kind: str
    cx: float
    cy: float
    radius: float
    angle: float = 0.0
    param: float = 0.5


def _halfplanes(dx: np.ndarray, dy: np.ndarray, angles: np.ndarray, offset: float) -> list[np.ndarray]:
    """``[cos(t) * x + sin(t) * y <= offset for t in angles]`` on the grid."""
    return [math.cos(t) * dx + math.sin(t) * dy <= offset for t in angles]


def shape_mask(spec: ShapeSpec, height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Pixels of ``spec`` inside its bounding window: ``((y0, y1, x0, x1), bool [y1-y0, x1-x0])``.

    A pixel belongs to the shape when its centre ``(x + 0.5, y + 0.5)`` does.
    """
    r = float(spec.radius)
    x0, x1 = max(math.floor(spec.cx - r), 0), min(math.ceil(spec.cx + r) + 1, width)
    y0, y1 = max(math.floor(spec.cy - r), 0), min(math.ceil(spec.cy + r) + 1, height)
    x0, y0 = min(x0, x1), min(y0, y1)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - np.float32(spec.cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - np.float32(spec.cy))[:, None]
    a, kind = spec.angle, spec.kind
    if kind == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif kind == "ring":
        rho2 = dx * dx + dy * dy
        mask = (rho2 <= r * r) & (rho2 >= (spec.param * r) ** 2)
    elif kind in ("ellipse", "cross"):
        c, s = math.cos(a), math.sin(a)
        u, v = c * dx + s * dy, c * dy - s * dx
        if kind == "ellipse":
            mask = (u / r) ** 2 + (v / (spec.param * r)) ** 2 <= 1.0
        else:  # a plus sign whose arm corners touch the circumscribed circle
            w, arm = 0.3 * r, r * math.sqrt(1.0 - 0.09)
            au, av = np.abs(u), np.abs(v)
            mask = ((au <= w) & (av <= arm)) | ((av <= w) & (au <= arm))
    elif kind in _POLYGON_SIDES:
        n = _POLYGON_SIDES[kind]
        angles = a + 2 * math.pi * np.arange(n) / n
        mask = np.logical_and.reduce(_halfplanes(dx, dy, angles, r * math.cos(math.pi / n)))
    elif kind == "star":  # pentagram: inside at least 4 of its 5 lines' half-planes
        angles = a + 2 * math.pi * np.arange(5) / 5
        inside = _halfplanes(dx, dy, angles, r * math.cos(2 * math.pi / 5))
        mask = np.sum(inside, axis=0) >= 4
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {', '.join(SHAPE_KINDS)}")
    return (y0, y1, x0, x1), mask


def paint(specs: list[ShapeSpec], height: int, width: int) -> np.ndarray:
    """Owner map uint8 ``[H, W]``: 0 background, ``k`` where shape ``k-1`` is visible (later shapes on top)."""
    owner = np.zeros((height, width), np.uint8)
    for k, spec in enumerate(specs, start=1):
        (y0, y1, x0, x1), mask = shape_mask(spec, height, width)
        owner[y0:y1, x0:x1][mask] = k
    return owner


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes float32 ``[N, 4]`` of bool masks ``[N, H, W]`` (``x1``/``y1`` exclusive)."""
    if len(masks) == 0:
        return np.zeros((0, 4), np.float32)
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]
    y0, y1 = rows.argmax(1), h - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), w - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


class ShapesSample(NamedTuple):
    """One generated image in compact form (what the cache holds)."""

    image: np.ndarray  # uint8 [3, H, W]
    owner: np.ndarray  # uint8 [H, W]: 0 background, k where instance k-1 is visible
    labels: np.ndarray  # int64 [N], 1..C
    boxes: np.ndarray  # float32 [N, 4] xyxy, tight boxes of the visible masks
    areas: np.ndarray  # float32 [N], visible pixels

    def masks(self) -> np.ndarray:
        """Visible masks, bool ``[N, H, W]``."""
        return self.owner[None] == np.arange(1, len(self.labels) + 1, dtype=np.uint8)[:, None, None]


def _interp_matrix(size: int, points: int) -> np.ndarray:
    """Linear interpolation weights ``[size, points]`` from ``points`` control points spanning ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * (points - 1)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(points)[None, :])).astype(np.float32)


class ShapesDataset(Dataset):
    """Deterministic synthetic shapes following the Dataset contract (see the module docstring)."""

    def __init__(self, split: str = "train", num_images: int = 512, image_size: int = 128, min_objects: int = 1,
                 max_objects: int = 4, classes: tuple[str, ...] = DEFAULT_CLASSES,
                 min_size: int | None = None, max_size: int | None = None, noise: float = 0.05, texture: float = 0.1,
                 min_visible: float = 0.3, seed: int = 0, cache: bool = True):
        if min_size is None:
            min_size = max(4, image_size // 8)
        if max_size is None:
            max_size = max(min_size, image_size // 2)
        _validate(locals())
        self.split, self.num_images, self.image_size = split, num_images, image_size
        self.min_objects, self.max_objects, self.classes = min_objects, max_objects, tuple(classes)
        self.min_size, self.max_size, self.noise, self.texture = min_size, max_size, noise, texture
        self.min_visible, self.seed, self.cache = min_visible, seed, cache
        self.categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(self.classes)]
        self._interp = _interp_matrix(image_size, _TEXTURE_GRID)
        self._cache: dict[int, ShapesSample] = {}
        self._coco = None

    def __len__(self) -> int:
        return self.num_images

    def params(self) -> dict:
        """The generation parameters (recorded in exported COCO files)."""
        keys = ("split", "num_images", "image_size", "min_objects", "max_objects", "classes", "min_size", "max_size",
                "noise", "texture", "min_visible", "seed")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in keys)}

    def image_id(self, index: int) -> int:
        """COCO image id of ``index`` (``index + 1``)."""
        return index + 1

    # --- generation ---------------------------------------------------------------------------
    def sample(self, index: int) -> ShapesSample:
        """Image ``index`` in compact form, from the cache when enabled."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"shapes index {index} out of range for {self.num_images} images")
        hit = self._cache.get(index)
        if hit is None:
            hit = self.generate(index)
            if self.cache:
                self._cache[index] = hit
        return hit

    def generate(self, index: int) -> ShapesSample:
        """Draw image ``index`` (no cache): a pure function of ``(seed, split, index)``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index]))
        base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
        image = self._background(rng, base)
        owner, labels = self._layout(rng, base, image)
        if self.noise > 0:  # triangular noise (sum of two uniform bytes): much cheaper than Gaussian
            pairs = np.frombuffer(rng.bytes(2 * image.size), np.uint8).reshape(2, *image.shape)
            image += (pairs.sum(0, dtype=np.int16) - np.int16(255)) * np.float32(self.noise / _TRIANGULAR_STD)
        image_u8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        masks = owner[None] == np.arange(1, len(labels) + 1, dtype=np.uint8)[:, None, None]
        areas = masks.sum((1, 2)).astype(np.float32)
        return ShapesSample(image_u8, owner, np.asarray(labels, np.int64), masks_to_boxes(masks), areas)

    def _background(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        s, t = self.image_size, np.float32(self.texture)
        grid = rng.standard_normal((3, _TEXTURE_GRID, _TEXTURE_GRID)).astype(np.float32) * t
        smooth = self._interp @ grid @ self._interp.T  # [3, S, S]
        angle, ramp, freq, phase = rng.uniform(0, 2 * math.pi), rng.uniform(-1, 1), rng.uniform(2, 8), rng.uniform(0, 2 * math.pi)
        xs = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
        proj = math.cos(angle) * xs[None, :] + math.sin(angle) * xs[:, None]
        pattern = np.float32(ramp) * t * proj + 0.5 * t * np.sin(np.float32(2 * math.pi * freq) * proj + np.float32(phase))
        return base[:, None, None] + smooth + pattern[None]

    def _random_spec(self, rng: np.random.Generator) -> tuple[int, ShapeSpec]:
        s = self.image_size
        label = int(rng.integers(len(self.classes)))
        r = rng.uniform(self.min_size, self.max_size) / 2
        cx, cy, angle = rng.uniform(r, s - r), rng.uniform(r, s - r), rng.uniform(0, 2 * math.pi)
        kind = self.classes[label]
        param = rng.uniform(0.4, 0.7) if kind == "ellipse" else rng.uniform(0.4, 0.6)
        return label + 1, ShapeSpec(kind, cx, cy, r, angle, param)

    def _colour(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        for _ in range(16):
            colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
            if np.linalg.norm(colour - base) >= _MIN_CONTRAST:
                break
        return colour

    def _layout(self, rng: np.random.Generator, base: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Paint shapes back to front into ``image``, re-drawing any that would hide an earlier one too much."""
        s = self.image_size
        owner = np.zeros((s, s), np.uint8)
        wanted = int(rng.integers(self.min_objects, self.max_objects + 1))
        labels: list[int] = []
        visible = np.zeros(0, np.int64)
        full = np.zeros(0, np.int64)
        for _ in range(wanted * _TRIES_PER_OBJECT):
            if len(labels) == wanted:
                break
            label, spec = self._random_spec(rng)
            colour = self._colour(rng, base)
            (y0, y1, x0, x1), mask = shape_mask(spec, s, s)
            area = int(mask.sum())
            if area < MIN_PIXELS:
                continue
            window = owner[y0:y1, x0:x1]
            covered = np.bincount(window[mask], minlength=len(labels) + 1)[1:]
            left = visible - covered
            if np.any((left < MIN_PIXELS) | (left < self.min_visible * full)):
                continue
            window[mask] = len(labels) + 1
            image[:, y0:y1, x0:x1][:, mask] = colour[:, None]
            visible, full = np.append(left, area), np.append(full, area)
            labels.append(label)
        return owner, labels

    # --- Dataset contract ---------------------------------------------------------------------
    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        sample = self.sample(index)
        image = torch.from_numpy(sample.image).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(sample.boxes.copy()),
            "labels": torch.from_numpy(sample.labels.copy()),
            "masks": torch.from_numpy(sample.masks().view(np.uint8)),
            "image_id": self.image_id(index),
            "area": torch.from_numpy(sample.areas.copy()),
            "iscrowd": torch.zeros(len(sample.labels), dtype=torch.int64),
        }
        return image, target

    def aspect_ratios(self) -> list[float]:
        """Width / height per image (all images are square)."""
        return [1.0] * self.num_images

    def file_name(self, index: int) -> str:
        """File name of image ``index`` in an exported copy."""
        return f"{self.image_id(index):06d}.png"

    def coco_record(self, index: int, first_annotation_id: int = 1,
                    sample: ShapesSample | None = None) -> tuple[dict, list[dict]]:
        """COCO image entry and annotations (compressed RLE, xywh boxes, visible areas) of image ``index``."""
        from pycocotools import mask as mask_utils

        sample = self.sample(index) if sample is None else sample
        image_id = self.image_id(index)
        image = {"id": image_id, "file_name": self.file_name(index), "width": self.image_size, "height": self.image_size}
        if not len(sample.labels):
            return image, []
        rles = mask_utils.encode(np.asfortranarray(sample.masks().transpose(1, 2, 0).view(np.uint8)))
        annotations = []
        for k, (label, box, area, rle) in enumerate(zip(sample.labels, sample.boxes, sample.areas, rles)):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": first_annotation_id + k, "image_id": image_id, "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": 0,
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            })
        return image, annotations

    def coco_header(self) -> dict:
        """The COCO dict without images and annotations: info (generation parameters) and categories."""
        info = {"description": "rcnn-lab synthetic shapes", "generator": "rcnn_lab.data.shapes", "params": self.params()}
        return {"info": info, "images": [], "annotations": [], "categories": [dict(c) for c in self.categories]}

    def to_coco_dict(self) -> dict:
        """The split as a COCO dict: RLE (compressed) segmentations, xywh boxes, visible areas."""
        data = self.coco_header()
        for index in range(self.num_images):
            image, annotations = self.coco_record(index, len(data["annotations"]) + 1)
            data["images"].append(image)
            data["annotations"].extend(annotations)
        return data

    def coco(self):
        """Ground truth as an in-memory ``pycocotools.coco.COCO`` (built once)."""
        if self._coco is None:
            from rcnn_lab.data.coco import coco_from_dict

            self._coco = coco_from_dict(self.to_coco_dict())
        return self._coco


def _validate(args: dict) -> None:
    """Raise one ConfigError listing every invalid argument (keys relative to the dataset spec)."""
    p: list[Problem] = []
    if args["split"] not in SPLITS:
        p.append(Problem("split", f"expected one of {', '.join(SPLITS)}, got {args['split']!r}"))
    for key, low in (("num_images", 1), ("image_size", 8), ("min_objects", 0), ("min_size", 4), ("seed", 0)):
        if args[key] < low:
            p.append(Problem(key, f"must be >= {low}, got {args[key]}"))
    for key, high in (("num_images", MAX_IMAGES), ("image_size", MAX_IMAGE_SIZE)):
        if args[key] > high:
            p.append(Problem(key, f"must be <= {high:,}, got {args[key]:,}"))
    if not args["min_objects"] <= args["max_objects"] <= 255:
        p.append(Problem("max_objects", f"must be between min_objects ({args['min_objects']}) and 255, got {args['max_objects']}"))
    if args["max_size"] < args["min_size"]:
        p.append(Problem("max_size", f"must be >= min_size ({args['min_size']}), got {args['max_size']}"))
    if args["max_size"] > args["image_size"]:
        p.append(Problem("max_size", f"must be <= image_size ({args['image_size']}), got {args['max_size']}"))
    for key in ("noise", "texture"):
        if args[key] < 0:
            p.append(Problem(key, f"must be >= 0, got {args[key]}"))
    if not 0 <= args["min_visible"] <= 1:
        p.append(Problem("min_visible", f"must be a fraction in [0, 1], got {args['min_visible']}"))
    classes = list(args["classes"])
    if not classes:
        p.append(Problem("classes", f"needs at least one shape; available: {', '.join(SHAPE_KINDS)}"))
    for i, name in enumerate(classes):
        if name not in SHAPE_KINDS:
            p.append(Problem(f"classes[{i}]", f"unknown shape {name!r}{did_you_mean(str(name), SHAPE_KINDS)} "
                             f"(available: {', '.join(SHAPE_KINDS)})"))
        elif name in classes[:i]:
            p.append(Problem(f"classes[{i}]", f"{name!r} is listed twice; remove the duplicate"))
    if p:
        raise ConfigError(p)


@DATASETS.register("shapes")
def shapes(
    split: Literal["train", "val"] = "train",
    num_images: Annotated[int, Bound(ge=1, le=MAX_IMAGES)] = 512,
    image_size: Annotated[int, Bound(ge=8, le=MAX_IMAGE_SIZE)] = 128,
    min_objects: int = 1,
    max_objects: int = 4,
    classes: list[str] = DEFAULT_CLASSES,
    min_size: int | None = None,
    max_size: int | None = None,
    noise: float = 0.05,
    texture: float = 0.1,
    min_visible: float = 0.3,
    seed: int = 0,
    cache: bool = True,
) -> ShapesDataset:
    """Synthetic shapes with occlusion: deterministic per (seed, split, index), no files needed.

    Args:
        split: ``train`` or ``val``; the two draw from disjoint random streams.
        num_images: images in the split.
        image_size: side of the square images in pixels.
        min_objects: fewest shapes per image (fewer only when an image is too crowded to place them).
        max_objects: most shapes per image.
        classes: shape kinds, in label order (label ``i+1`` is ``classes[i]``). Available: circle,
            square, triangle, ellipse, pentagon, hexagon, star, ring, cross. Set ``model.num_classes``
            to ``len(classes) + 1`` (6 for the default five).
        min_size: smallest shape, as the diameter of its circumscribed circle in pixels
            (null: ``image_size // 8``, at least 4).
        max_size: largest shape, at most ``image_size`` (null: ``image_size // 2``).
        noise: standard deviation of per-pixel noise (image values in [0, 1]; triangular distribution).
        texture: strength of the background texture (0 gives a flat background).
        min_visible: smallest visible fraction of a shape's own area that occlusion may leave.
        seed: dataset seed (>= 0), independent of the training seed.
        cache: keep generated images in memory (about 65 KB per 128 px image; per worker process).
    """
    return ShapesDataset(split, num_images, image_size, min_objects, max_objects, tuple(classes), min_size, max_size,
                         noise, texture, min_visible, seed, cache)
