"""One norm vocabulary for backbones, FPN and heads; GroupNorm widths checked with the key to change."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import misc as misc_nn_ops

import rcnn_lab
from rcnn_lab.errors import ConfigError
from rcnn_lab.models.norms import norm_layer
from tests.conftest import EXPERIMENTS


@pytest.mark.parametrize("norm, kind", [
    ("batchnorm", nn.BatchNorm2d), ("frozen_batchnorm", misc_nn_ops.FrozenBatchNorm2d), ("groupnorm", nn.GroupNorm),
])
def test_each_name_builds_its_layer(norm, kind):
    layer = norm_layer(norm, [64, 96])(64)
    assert isinstance(layer, kind)
    assert layer(torch.rand(2, 64, 4, 4)).shape == (2, 64, 4, 4)
    assert norm_layer("none") is None


def test_groupnorm_names_the_key_and_the_widths_it_cannot_split():
    with pytest.raises(ConfigError) as info:
        norm_layer("groupnorm", [64, 48, 40, 48], "conv_layers")
    (problem,) = info.value.problems
    assert problem.path == "conv_layers"
    assert "got 40, 48" in problem.message and "multiple of 32" in problem.message
    norm_layer("batchnorm", [48], "conv_layers")  # other norms take any width


@pytest.mark.parametrize("overrides, key", [
    (["model.roi_heads.box_head={type: conv_fc, conv_layers: [64, 48], fc_layers: [128], norm: groupnorm}"],
     "model.roi_heads.box_head.conv_layers"),
    (["model.roi_heads.mask_head.norm=groupnorm", "model.roi_heads.mask_head.layers=[256, 100]"],
     "model.roi_heads.mask_head.layers"),
])
def test_a_head_too_narrow_for_groupnorm_fails_at_load_with_its_dotted_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", overrides)
    assert [p.path for p in info.value.problems] == [key]
    assert "multiple of 32" in str(info.value)


def test_mobilenet_rejects_groupnorm_at_load():
    with pytest.raises(ConfigError) as info:
        rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", ["model.backbone={type: mobilenet_v3_fpn, norm: groupnorm}"])
    assert [p.path for p in info.value.problems] == ["model.backbone.norm"]
