"""Mask heads (pooled RoI features -> mask features) and mask predictors."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from rcnn_lab.models.norms import FreshNorm, norm_layer
from rcnn_lab.registry import MASK_HEADS, MASK_PREDICTORS


@MASK_HEADS.register("conv_stack")
def conv_stack(
    in_channels: int,
    layers: list[int] = (256, 256, 256, 256),
    dilation: int = 1,
    norm: FreshNorm = "none",
) -> nn.Module:
    """MaskRCNNHeads: a stack of 3x3 convs (torchvision's default: 4 x 256)."""
    head = MaskRCNNHeads(in_channels, list(layers), dilation, norm_layer(norm, layers, "layers"))
    head.out_channels = list(layers)[-1]
    return head


@MASK_PREDICTORS.register("mask_rcnn")
def mask_rcnn(in_channels: int, num_classes: int, dim_reduced: int = 256) -> nn.Module:
    """MaskRCNNPredictor: 2x transposed-conv upsampling then 1x1 per-class mask logits."""
    return MaskRCNNPredictor(in_channels, dim_reduced, num_classes)
