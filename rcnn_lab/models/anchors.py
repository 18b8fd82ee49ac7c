"""Anchor generators."""

from __future__ import annotations

from torchvision.models.detection.anchor_utils import AnchorGenerator

from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.registry import ANCHOR_GENERATORS


@ANCHOR_GENERATORS.register("grid")
def grid(
    sizes: list[list[int]] = ((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios: list[list[float]] = ((0.5, 1.0, 2.0),),
) -> AnchorGenerator:
    """torchvision AnchorGenerator: one size tuple per feature map; ratios once for all or per map."""
    problems = []
    if not sizes or any(not s for s in sizes):
        problems.append(Problem("sizes", "needs one non-empty list of sizes per feature map"))
    if any(v <= 0 for s in sizes for v in s):
        problems.append(Problem("sizes", "anchor sizes must be positive"))
    if len(aspect_ratios) not in (1, len(sizes)):
        problems.append(Problem(
            "aspect_ratios",
            f"has {len(aspect_ratios)} lists; give 1 (shared) or one per feature map ({len(sizes)})",
        ))
    if any(not r or any(v <= 0 for v in r) for r in aspect_ratios):
        problems.append(Problem("aspect_ratios", "ratios must be non-empty lists of positive numbers"))
    if problems:
        raise ConfigError(problems)
    ratios = list(aspect_ratios) * len(sizes) if len(aspect_ratios) == 1 else list(aspect_ratios)
    return AnchorGenerator(
        tuple(tuple(int(v) for v in s) for s in sizes), tuple(tuple(float(v) for v in r) for r in ratios)
    )
