"""Box heads (pooled RoI features -> representation) and box predictors."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead

from rcnn_lab.models.norms import FreshNorm, norm_layer
from rcnn_lab.registry import BOX_HEADS, BOX_PREDICTORS


@BOX_HEADS.register("two_mlp")
def two_mlp(in_channels: int, resolution: tuple[int, int], representation_size: int = 1024) -> nn.Module:
    """TwoMLPHead: flatten, fc6, fc7 (torchvision's default Mask R-CNN box head)."""
    head = TwoMLPHead(in_channels * resolution[0] * resolution[1], representation_size)
    head.out_channels = representation_size
    return head


@BOX_HEADS.register("conv_fc")
def conv_fc(
    in_channels: int,
    resolution: tuple[int, int],
    conv_layers: list[int] = (256, 256, 256, 256),
    fc_layers: list[int] = (1024,),
    norm: FreshNorm = "batchnorm",
) -> nn.Module:
    """FastRCNNConvFCHead: 3x3 convs then fully connected layers (detectron2's 4conv1fc)."""
    head = FastRCNNConvFCHead((in_channels, *resolution), list(conv_layers), list(fc_layers),
                              norm_layer(norm, conv_layers, "conv_layers"))
    head.out_channels = list(fc_layers)[-1]
    return head


@BOX_PREDICTORS.register("fast_rcnn")
def fast_rcnn(in_channels: int, num_classes: int) -> nn.Module:
    """FastRCNNPredictor: linear class scores and per-class box deltas."""
    return FastRCNNPredictor(in_channels, num_classes)
