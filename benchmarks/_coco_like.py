"""A synthetic dataset with COCO's image size, object counts and object sizes (registered as ``coco_like``).

For throughput measurements only: what costs time in a Mask R-CNN step is the image size, how many
ground-truth instances each image has and how big they are (anchor matching, mask targets), not
what the pixels show. COCO train2017 (instances_train2017.json): 7.3 instances per image on
average with a long tail, 41 % of them small (area < 32^2 px), 34 % medium (< 96^2), 24 % large,
at ~640x480; an image resized for Mask R-CNN (shorter side 800) is ~1.67x larger per side.

Each image here: noise over a colour ramp, ``Geometric(1 / mean_objects)`` instances (at most
``max_objects``), each an ellipse filling its box, its size class drawn with COCO's shares and
its side log-uniform within the class (scaled by ``scale``), aspect ratio log-uniform in [1/3, 3].
``pool`` distinct images are generated once per process and cycled (index ``i`` is image
``i % pool``), held as float tensors (page-locked with ``pin``) that every instance with the same
parameters shares, so loading a batch costs no drawing and no copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from rcnn_lab.registry import DATASETS

_POOLS: dict[tuple, tuple[torch.Tensor, dict]] = {}  # shared by every instance: a suite builds many with the same images
AREA_SHARES = {"small": 0.41, "medium": 0.34, "large": 0.25}  # COCO train2017 instances by area range
SIDES = {"small": (6.0, 32.0), "medium": (32.0, 96.0), "large": (96.0, 400.0)}  # sqrt(area) ranges at COCO scale


def draw(rng: np.random.Generator, height: int, width: int, mean_objects: float, max_objects: int,
         scale: float, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image: uint8 ``[3, H, W]``, boxes float32 ``[N, 4]``, labels int64 ``[N]``, masks uint8 ``[N, H, W]``."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    a, b, c = rng.uniform(0.2, 0.8, size=(3, 3)).astype(np.float32)
    image = a[:, None, None] + (b - a)[:, None, None] * xs + (c - a)[:, None, None] * ys * 0.5
    count = min(int(rng.geometric(1.0 / mean_objects)), max_objects)
    kinds = rng.choice(list(AREA_SHARES), size=count, p=list(AREA_SHARES.values()))
    boxes, masks = [], []
    for kind in kinds:
        low, high = SIDES[kind]
        side = math.exp(rng.uniform(math.log(low), math.log(high))) * scale
        ratio = math.exp(rng.uniform(-math.log(3.0), math.log(3.0)))
        w, h = min(side * math.sqrt(ratio), width - 1.0), min(side / math.sqrt(ratio), height - 1.0)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = np.array([x0, y0, x0 + w, y0 + h], np.float32)
        mask = np.zeros((height, width), np.uint8)
        c0, c1, r0, r1 = int(x0), min(int(math.ceil(x0 + w)), width), int(y0), min(int(math.ceil(y0 + h)), height)
        u = (np.arange(c0, c1, dtype=np.float32) + 0.5 - (x0 + w / 2)) / (w / 2)
        v = (np.arange(r0, r1, dtype=np.float32) + 0.5 - (y0 + h / 2)) / (h / 2)
        inside = u[None, :] ** 2 + v[:, None] ** 2 <= 1.0
        if not inside.any():  # a sliver: keep its centre pixel so every instance has a mask
            inside[len(v) // 2, len(u) // 2] = True
        mask[r0:r1, c0:c1] = inside
        image[:, r0:r1, c0:c1][:, inside] = rng.uniform(0.0, 1.0, size=(3, 1)).astype(np.float32)
        boxes.append(box)
        masks.append(mask)
    image += rng.standard_normal(image.shape, dtype=np.float32) * 0.05
    image_u8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    labels = rng.integers(1, num_classes + 1, size=count).astype(np.int64)
    return (image_u8, np.stack(boxes) if boxes else np.zeros((0, 4), np.float32), labels,
            np.stack(masks) if masks else np.zeros((0, height, width), np.uint8))


class CocoLikeDataset(Dataset):
    """See the module docstring; Dataset contract (``categories``, ``coco()``, ``aspect_ratios()``)."""

    def __init__(self, split: str = "train", num_images: int = 10000, height: int = 800, width: int = 1333,
                 mean_objects: float = 7.3, max_objects: int = 50, scale: float = 1.67, num_classes: int = 80,
                 pool: int = 16, pin: bool = False, seed: int = 0):
        self.num_images, self.height, self.width, self.pool, self.pin = num_images, height, width, pool, pin
        self.args = (mean_objects, max_objects, scale, num_classes)
        self.seed = seed + (0 if split == "train" else 1)
        self.categories = [{"id": i + 1, "name": f"class{i + 1}", "supercategory": "synthetic"} for i in range(num_classes)]
        self._coco = None

    def __len__(self) -> int:
        return self.num_images

    def _item(self, slot: int) -> tuple[torch.Tensor, dict]:
        key = (self.seed, slot, self.height, self.width, self.args, self.pin)
        if key not in _POOLS:
            rng = np.random.default_rng([self.seed, slot])
            image, boxes, labels, masks = draw(rng, self.height, self.width, *self.args)
            tensors = {"image": torch.from_numpy(image).float().div_(255.0), "boxes": torch.from_numpy(boxes),
                       "labels": torch.from_numpy(labels), "masks": torch.from_numpy(masks)}
            if self.pin:
                tensors = {k: v.pin_memory() for k, v in tensors.items()}
            areas = torch.from_numpy(masks.reshape(len(labels), -1).sum(1).astype(np.float32))
            _POOLS[key] = (tensors["image"], {"boxes": tensors["boxes"], "labels": tensors["labels"],
                                                    "masks": tensors["masks"], "area": areas,
                                                    "iscrowd": torch.zeros(len(labels), dtype=torch.int64)})
        return _POOLS[key]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self._item(index % self.pool)
        return image, {**target, "image_id": index + 1}

    def aspect_ratios(self) -> list[float]:
        return [self.width / self.height] * self.num_images

    def coco(self):
        """Ground truth of every image as an in-memory COCO object (RLE masks)."""
        if self._coco is None:
            from pycocotools import mask as mask_utils

            from rcnn_lab.data.coco import coco_from_dict

            images, annotations = [], []
            for index in range(self.num_images):
                _, target = self[index]
                images.append({"id": index + 1, "width": self.width, "height": self.height, "file_name": f"{index + 1}.png"})
                rles = mask_utils.encode(np.asfortranarray(target["masks"].numpy().transpose(1, 2, 0)))
                for box, label, area, rle in zip(target["boxes"].tolist(), target["labels"].tolist(),
                                                 target["area"].tolist(), rles):
                    annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": area,
                                        "iscrowd": 0, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
            self._coco = coco_from_dict({"images": images, "annotations": annotations, "categories": self.categories})
        return self._coco


def coco_like(split: str = "train", num_images: int = 10000, height: int = 800, width: int = 1333,
              mean_objects: float = 7.3, max_objects: int = 50, scale: float = 1.67, num_classes: int = 80,
              pool: int = 16, pin: bool = False, seed: int = 0) -> CocoLikeDataset:
    """Synthetic images with COCO's size, instance counts and instance sizes (benchmarks only)."""
    return CocoLikeDataset(split, num_images, height, width, mean_objects, max_objects, scale, num_classes, pool, pin, seed)


if "coco_like" not in DATASETS:  # register once, however often the module is loaded
    DATASETS.register("coco_like")(coco_like)
