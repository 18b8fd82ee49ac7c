"""What a model costs: inference FLOPs (``torch.utils.flop_counter.FlopCounterMode``).

FLOPs are counted for one inference forward of one validation image, which the model's own
transform resizes to the configured size (``model.transform.min_size`` / ``max_size``), so the
figure is the cost at the configured image size with the detections that image really produces
(the mask head runs on them). ``FlopCounterMode`` counts the operators it has formulas for
(convolutions, matrix products, attention), 1 multiply-add = 2 FLOPs; RoIAlign, NMS and
element-wise operations are not counted, as in the FLOP counters of detectron2 and MMDetection.
"""

from __future__ import annotations

import torch
from torch import nn


def inference_gflops(model: nn.Module, image: torch.Tensor, device: torch.device | str) -> float:
    """GFLOPs of ``model([image])`` in eval mode (train/eval flags of every submodule restored afterwards)."""
    from torch.utils.flop_counter import FlopCounterMode

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model([image.to(device)])
    finally:
        for m, training in modes:
            m.training = training
    return counter.get_total_flops() / 1e9
