"""The one place built-in components are registered: every module listed here is imported."""

from __future__ import annotations

import importlib

BUILTIN_MODULES = (
    "rcnn_lab.models.backbones",
    "rcnn_lab.models.anchors",
    "rcnn_lab.models.rpn_heads",
    "rcnn_lab.models.poolers",
    "rcnn_lab.models.box_heads",
    "rcnn_lab.models.mask_heads",
    "rcnn_lab.data.shapes",
    "rcnn_lab.data.coco",
    "rcnn_lab.data.transforms",
    "rcnn_lab.engine.optim",
)


def register_builtins() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(name)
