"""Training-time augmentation of image and target (registered in ``TRANSFORMS``), and ``Compose``.

Each factory returns a callable ``(image, target, generator=None) -> (image, target)``: image
float32 ``[3, H, W]`` in [0, 1], target as in the Dataset contract. Inputs are not modified.

Reproducibility: every random draw comes from ``generator`` (a ``torch.Generator``) when one is
given, else from torch's global RNG. The loader (``rcnn_lab.data.loader``) seeds one generator
per sample from ``(seed, epoch, index)``, so augmentation does not depend on the number of
workers, on batch order or on resuming. Each transform draws the same number of values whatever
the outcome (a flip that does not happen still consumes its draw).

Plugin transforms that take only ``(image, target)`` still work under ``Compose``: they run with
torch's, Python's and numpy's global RNGs temporarily seeded from the generator, and restored after.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.registry import TRANSFORMS

Transform = Callable[..., tuple[torch.Tensor, dict]]


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class HFlip:
    """Flip image, boxes and masks left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        if _uniform(generator) >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"]
            target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"HFlip(p={self.p})"


class ResizeRange:
    """Resize so the shorter side is a random integer in ``[min_size, max_size]`` (bilinear image, nearest masks)."""

    def __init__(self, min_size: int, max_size: int, max_long_side: int | None = None):
        self.min_size, self.max_size, self.max_long_side = min_size, max_size, max_long_side

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        short = int(torch.randint(self.min_size, self.max_size + 1, (), generator=generator))
        h, w = image.shape[-2:]
        scale = short / min(h, w)
        if self.max_long_side is not None and max(h, w) * scale > self.max_long_side:
            scale = self.max_long_side / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) == (h, w):
            return image, target
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=scale < 1)[0].clamp_(0.0, 1.0)
        sx, sy = nw / w, nh / h
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        if "masks" in target:
            m = target["masks"]
            if len(m):
                target["masks"] = F.interpolate(m[None].float(), size=(nh, nw), mode="nearest-exact")[0].to(m.dtype)
            else:
                target["masks"] = m.new_zeros((0, nh, nw))
        return image, target

    def __repr__(self) -> str:
        return f"ResizeRange(min_size={self.min_size}, max_size={self.max_size}, max_long_side={self.max_long_side})"


class ColorJitter:
    """Random brightness, contrast and saturation factors in ``[1 - x, 1 + x]``, applied in that order."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        fb, fc, fs = (_uniform(generator, 1 - x, 1 + x) for x in (self.brightness, self.contrast, self.saturation))
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)[:, None, None]
        out = image * fb
        mean = (out * weights).sum(0).mean()
        out = (out - mean) * fc + mean
        gray = (out * weights).sum(0, keepdim=True)
        out = (out - gray) * fs + gray
        return out.clamp_(0.0, 1.0), target

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


def accepts_generator(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``generator`` argument (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's (CPU), Python's and numpy's global RNGs; restore their states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class Compose:
    """Apply transforms in order, sharing one generator."""

    def __init__(self, transforms: Sequence[Transform] = ()):
        self.transforms = list(transforms)
        self._takes_generator = [accepts_generator(t) for t in self.transforms]

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        for t, takes in zip(self.transforms, self._takes_generator):
            if takes:
                image, target = t(image, target, generator=generator)
            elif generator is None:
                image, target = t(image, target)
            else:
                seed = int(torch.randint(0, 2**62, (), generator=generator))
                with seeded_global_rngs(seed):
                    image, target = t(image, target)
        return image, target

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


@TRANSFORMS.register("hflip")
def hflip(p: float = 0.5) -> HFlip:
    """Horizontal flip of image, boxes and masks with probability p.

    Args:
        p: probability of flipping, in [0, 1].
    """
    if not 0.0 <= p <= 1.0:
        raise ConfigError([Problem("p", f"must be a probability in [0, 1], got {p}")])
    return HFlip(p)


@TRANSFORMS.register("resize_range")
def resize_range(min_size: int, max_size: int, max_long_side: int | None = None) -> ResizeRange:
    """Random rescale: shorter side uniform in [min_size, max_size]; boxes scaled, masks nearest.

    Boxes are scaled, not recomputed from the resized masks. The model's own transform
    (``model.transform``) resizes again afterwards, so this mostly matters together with a model
    resize that keeps the input scale, or as interpolation noise.

    Args:
        min_size: smallest shorter side in pixels.
        max_size: largest shorter side in pixels.
        max_long_side: cap on the longer side (null: no cap).
    """
    problems = []
    if min_size < 1:
        problems.append(Problem("min_size", f"must be >= 1, got {min_size}"))
    if max_size < min_size:
        problems.append(Problem("max_size", f"must be >= min_size ({min_size}), got {max_size}"))
    if max_long_side is not None and max_long_side < 1:
        problems.append(Problem("max_long_side", f"must be >= 1 or null, got {max_long_side}"))
    if problems:
        raise ConfigError(problems)
    return ResizeRange(min_size, max_size, max_long_side)


@TRANSFORMS.register("color_jitter")
def color_jitter(brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2) -> ColorJitter:
    """Light photometric jitter: brightness, contrast and saturation factors in [1 - x, 1 + x].

    Args:
        brightness: brightness jitter, in [0, 1).
        contrast: contrast jitter, in [0, 1).
        saturation: saturation jitter, in [0, 1).
    """
    bad = [Problem(k, f"must be in [0, 1), got {v}") for k, v in
           (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)) if not 0.0 <= v < 1.0]
    if bad:
        raise ConfigError(bad)
    return ColorJitter(brightness, contrast, saturation)
