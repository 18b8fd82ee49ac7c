"""Normalisation layers by config name: one vocabulary for backbones, the FPN and the heads.

``none | batchnorm | frozen_batchnorm | groupnorm`` (GroupNorm with 32 groups, detectron2's
default). GroupNorm needs every width it normalises to be a multiple of 32: :func:`norm_layer`
checks the widths a component will normalise, so a config fails with the key to change instead
of torch's ``ValueError`` from deep inside a model constructor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from torch import nn
from torchvision.ops import misc as misc_nn_ops

from rcnn_lab.errors import ConfigError, Problem

Norm = Literal["none", "batchnorm", "frozen_batchnorm", "groupnorm"]
BodyNorm = Literal["batchnorm", "frozen_batchnorm", "groupnorm"]
"""What a classification body (ResNet) may use; frozen_batchnorm is for pretrained weights."""
FreshNorm = Literal["none", "batchnorm", "groupnorm"]
"""What freshly built layers (FPN, heads) may use: frozen statistics mean nothing there."""
GROUPS = 32


def norm_layer(norm: Norm, widths: Iterable[int] = (), key: str = "norm") -> Callable[[int], nn.Module] | None:
    """The ``norm_layer`` torchvision's constructors take (``None`` for ``none``).

    ``widths`` are the channel counts the layer will normalise and ``key`` the config key that
    sets them, named in the error when GroupNorm cannot divide them into 32 groups.
    """
    if norm == "groupnorm":
        bad = sorted({int(w) for w in widths if int(w) % GROUPS})
        if bad:
            raise ConfigError([Problem(key, f"norm groupnorm uses {GROUPS} groups, so every width must be a multiple of "
                                            f"{GROUPS}; got {', '.join(map(str, bad))}: use multiples of {GROUPS} here or norm batchnorm")])
        return lambda channels: nn.GroupNorm(GROUPS, channels)
    return {"none": None, "batchnorm": nn.BatchNorm2d, "frozen_batchnorm": misc_nn_ops.FrozenBatchNorm2d}[norm]
