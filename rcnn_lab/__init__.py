"""rcnn-lab: a config-driven experiment and ablation framework around torchvision's Mask R-CNN."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_experiment", "build_model"]


def load_experiment(path, overrides=()):
    """Load and validate an experiment file: ``.variants`` each with ``.name`` and ``.config``."""
    from rcnn_lab.config.loader import load_experiment as _load

    return _load(path, list(overrides))


def build_model(model_config):
    """Build the torchvision ``MaskRCNN`` for a validated ``ModelConfig`` (``variant.config.model``)."""
    from rcnn_lab.models.builder import build_model as _build

    return _build(model_config)
