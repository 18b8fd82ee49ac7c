"""``engine.cost.inference_gflops`` counts a known model's FLOPs exactly and leaves its train/eval flags alone."""

from __future__ import annotations

import torch
from torch import nn

from rcnn_lab.engine.cost import inference_gflops


class ListConv(nn.Module):
    """A detection-style model: takes a list of images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, images):
        x = self.conv(torch.stack(images))
        return self.fc(x.mean((2, 3)))


def test_gflops_of_a_conv_and_a_linear_layer_and_modes_restored():
    model = ListConv().train()
    model.fc.eval()
    flops = inference_gflops(model, torch.rand(3, 16, 20), "cpu") * 1e9
    conv = 2 * 3 * 8 * 3 * 3 * 16 * 20  # 2 FLOPs per multiply-add, one per output pixel and kernel tap
    assert flops == conv + 2 * 8 * 4
    assert model.training and model.conv.training and not model.fc.training
