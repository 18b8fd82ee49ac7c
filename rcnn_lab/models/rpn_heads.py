"""RPN heads."""

from __future__ import annotations

from torchvision.models.detection.rpn import RPNHead

from rcnn_lab.registry import RPN_HEADS


@RPN_HEADS.register("conv")
def conv(in_channels: int, num_anchors: int, conv_depth: int = 1) -> RPNHead:
    """torchvision RPNHead: conv_depth 3x3 convs, then 1x1 cls_logits and bbox_pred."""
    return RPNHead(in_channels, num_anchors, conv_depth=conv_depth)
