"""rcnn-lab: a config-driven experiment and ablation framework around torchvision's Mask R-CNN."""

from __future__ import annotations

from rcnn_lab._version import __version__

__all__ = ["__version__", "load_experiment", "build_model"]


def load_experiment(path, overrides=()):
    """Load and validate an experiment file: ``.variants`` each with ``.name`` and ``.config``."""
    from rcnn_lab.engine.preflight import load_experiment as _load

    return _load(path, list(overrides))


def build_model(model_config):
    """Build the torchvision ``MaskRCNN`` for a validated ``ModelConfig`` (``variant.config.model``)."""
    from rcnn_lab.components import register_builtins
    from rcnn_lab.models.builder import build_model as _build

    register_builtins()
    return _build(model_config)
