from __future__ import annotations

import pytest
from torch import nn

from rcnn_lab.components import register_builtins
from rcnn_lab.config.types import Spec
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.registry import BOX_HEADS, FAMILIES, ROI_POOLERS, Registry

REQUIRED_FAMILIES = {
    "backbone", "anchor_generator", "rpn_head", "roi_pooler", "box_head", "box_predictor",
    "mask_head", "mask_predictor", "dataset", "optimizer", "lr_scheduler",
}
BUILTINS = {
    "backbone": {"resnet_fpn", "mobilenet_v3_fpn"}, "anchor_generator": {"grid"}, "rpn_head": {"conv"},
    "roi_pooler": {"multiscale_roi_align", "differentiable_roi_align"}, "box_head": {"two_mlp", "conv_fc"},
    "box_predictor": {"fast_rcnn"}, "mask_head": {"conv_stack"}, "mask_predictor": {"mask_rcnn"},
    "dataset": {"shapes", "coco"}, "optimizer": {"sgd", "adamw"}, "lr_scheduler": {"multistep", "cosine"},
    "transform": {"hflip"},
}


def test_every_family_exists_with_its_builtins():
    register_builtins()
    assert REQUIRED_FAMILIES <= set(FAMILIES)
    for family, names in BUILTINS.items():
        assert names <= set(FAMILIES[family].names()), family


def test_duplicate_name_raises():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: 2)


def test_unknown_type_lists_names_and_closest():
    problems: list[Problem] = []
    ROI_POOLERS.check_spec({"type": "multiscale_roi_alig"}, "model.roi_heads.box_pooler", problems)
    msg = str(problems[0])
    assert problems[0].path == "model.roi_heads.box_pooler.type"
    assert "closest match 'multiscale_roi_align'" in msg
    for name in ROI_POOLERS.names():
        assert name in msg


def test_unknown_argument_names_path_and_suggestion():
    problems: list[Problem] = []
    BOX_HEADS.check_spec({"type": "two_mlp", "representaton_size": 5}, "model.roi_heads.box_head", problems)
    assert [p.path for p in problems] == ["model.roi_heads.box_head.representaton_size"]
    assert "did you mean 'representation_size'" in problems[0].message


def test_wrong_type_and_injected_argument_are_problems():
    problems: list[Problem] = []
    BOX_HEADS.check_spec({"type": "two_mlp", "representation_size": "big", "in_channels": 3}, "h", problems)
    messages = {p.path: p.message for p in problems}
    assert "expected int" in messages["h.representation_size"]
    assert "set by the model builder" in messages["h.in_channels"]


def test_missing_required_argument():
    reg = Registry("thing")
    reg.register("needs")(lambda size: size)
    problems: list[Problem] = []
    reg.check_spec({"type": "needs"}, "x", problems)
    assert problems[0].path == "x.size" and "missing" in problems[0].message
    assert reg.build(Spec("needs", {"size": 3})) == 3


def test_factory_errors_are_rooted_at_the_spec_path():
    reg = Registry("thing")

    @reg.register("bad")
    def bad():
        raise ConfigError("out of range", path="depth")

    with pytest.raises(ConfigError) as exc:
        reg.build(Spec("bad", {}), "model.backbone")
    assert exc.value.problems[0].path == "model.backbone.depth"


def test_build_injects_only_declared_arguments():
    spec = Spec("two_mlp", {"representation_size": 8})
    head = BOX_HEADS.build(spec, "h", in_channels=2, resolution=(3, 3), unrelated=1)
    assert isinstance(head, nn.Module) and head.out_channels == 8
    assert head.fc6.in_features == 2 * 3 * 3
