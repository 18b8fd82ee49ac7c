"""Example plugin: a lighter mask head (depthwise-separable convs), used by heads_ablation.yaml.

Every ``*.py`` in this folder is loaded by rcnn-lab before an experiment is validated, so the
component below is available as ``model.roi_heads.mask_head: {type: light_separable, ...}``.
"""

from torch import nn

from rcnn_lab.registry import MASK_HEADS


class SeparableMaskHead(nn.Sequential):
    def __init__(self, in_channels: int, channels: int, layers: int):
        blocks = []
        for i in range(layers):
            c_in = in_channels if i == 0 else channels
            blocks += [
                nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),  # depthwise
                nn.Conv2d(c_in, channels, 1),  # pointwise
                nn.ReLU(inplace=True),
            ]
        super().__init__(*blocks)
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


@MASK_HEADS.register("light_separable")
def light_separable(in_channels: int, channels: int = 128, layers: int = 2) -> nn.Module:
    """Depthwise-separable 3x3 conv stack: ~20x fewer parameters than conv_stack's 4 x 256."""
    return SeparableMaskHead(in_channels, channels, layers)
