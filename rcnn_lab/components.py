"""The one place built-in components are registered: every module listed here is imported.

Registries (``rcnn_lab.registry``) start empty; :func:`register_builtins` fills them. It sits
above the modules it lists (models, data, ``engine.optim``), and everything that needs the
built-ins (loading an experiment, the trainer, the ``components`` command) calls it first.
"""

from __future__ import annotations

import importlib

from rcnn_lab._check import check_torchvision_ops
from rcnn_lab.registry import FAMILIES, Registry

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
    """Register every built-in component (once per process; the install check runs on every call).

    The built-ins import torchvision, so the check that its compiled ops load with this torch
    (``BrokenInstallError``, exit 3) runs first.
    """
    check_torchvision_ops()
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


def builtin_families():
    """``family -> registry`` for ``config.types.convert``: registers the built-ins when the first spec is checked."""
    ready = False

    def family(name: str) -> Registry:
        nonlocal ready
        if not ready:
            register_builtins()
            ready = True
        return FAMILIES[name]

    return family
