"""RoI poolers: torchvision's MultiScaleRoIAlign output; the differentiable one adds box gradients."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

import rcnn_lab.models.poolers  # noqa: F401  (registers the poolers)
from rcnn_lab.config.types import Spec
from rcnn_lab.errors import ConfigError
from rcnn_lab.models.poolers import AlignedMultiScaleRoIAlign, DifferentiableMultiScaleRoIAlign
from rcnn_lab.ops.roi_align import roi_align
from rcnn_lab.registry import ROI_POOLERS

NAMES = ["0", "1", "2", "3"]
IMAGE_SHAPES = [(128, 160), (120, 150)]  # (height, width) before the backbone; padded batch 128 x 160


def fpn_features(channels: int = 4, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Feature maps of strides 4, 8, 16, 32 (plus an unused 'pool' level) for a batch of 2."""
    g = torch.Generator().manual_seed(seed)
    feats = OrderedDict((name, torch.randn(2, channels, 128 // s, 160 // s, generator=g)) for name, s in zip(NAMES, (4, 8, 16, 32)))
    feats["pool"] = torch.randn(2, channels, 2, 3, generator=g)
    return feats


def boxes_per_image(seed: int = 0) -> list[torch.Tensor]:
    """Boxes of sizes 4..140 px (all four FPN levels), some crossing the image border."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, (h, w) in zip((30, 25), IMAGE_SHAPES):
        size = torch.exp(torch.rand(n, 2, generator=g) * 3.5) * 4
        start = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - size / 4
        out.append(torch.cat([start, start + size], dim=1))
    return out


def build(name: str, **kwargs):
    return ROI_POOLERS.build(Spec(name, kwargs), featmap_names=NAMES)


def test_registered_with_box_gradient_meta():
    assert ROI_POOLERS.get("multiscale_roi_align").meta["box_gradient"] is False
    assert ROI_POOLERS.get("differentiable_roi_align").meta["box_gradient"] is True
    for name in ("multiscale_roi_align", "differentiable_roi_align"):
        assert ROI_POOLERS.get(name).summary
        assert "featmap_names" not in {p.name for p in ROI_POOLERS.get(name).params()}


def test_modules_and_output_size():
    plain = build("multiscale_roi_align")
    assert type(plain) is MultiScaleRoIAlign and plain.output_size == (7, 7) and plain.sampling_ratio == 2
    assert isinstance(build("multiscale_roi_align", aligned=True), AlignedMultiScaleRoIAlign)
    diff = build("differentiable_roi_align", output_size=[14, 10], sampling_ratio=0)
    assert isinstance(diff, DifferentiableMultiScaleRoIAlign) and isinstance(diff, MultiScaleRoIAlign)
    assert diff.output_size == (14, 10) and diff.sampling_ratio == 0 and diff.featmap_names == NAMES
    with pytest.raises(ConfigError, match="output_size"):
        build("differentiable_roi_align", output_size=[1, 2, 3])


@pytest.mark.parametrize("name", ["multiscale_roi_align", "differentiable_roi_align"])
@pytest.mark.parametrize(("output_size", "sampling_ratio"), [(7, 2), (14, 2), (5, 0)])
def test_pooler_matches_torchvision(name, output_size, sampling_ratio):
    feats, boxes = fpn_features(), boxes_per_image()
    ref = MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    expected = ref(feats, boxes, IMAGE_SHAPES)
    pooler = build(name, output_size=output_size, sampling_ratio=sampling_ratio)
    out = pooler(feats, boxes, IMAGE_SHAPES)
    assert out.shape == (55, 4, output_size, output_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert pooler.scales == ref.scales and pooler.map_levels.k_min == 2 and pooler.map_levels.k_max == 5


@pytest.mark.parametrize("name", ["multiscale_roi_align", "differentiable_roi_align"])
def test_aligned_is_honoured(name):
    """aligned=True pools each level with roi_align(..., aligned=True) on torchvision's levels."""
    feats, boxes = fpn_features(), boxes_per_image()
    pooler = build(name, aligned=True)
    out = pooler(feats, boxes, IMAGE_SHAPES)
    levels = pooler.map_levels(boxes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    for level, (key, scale) in enumerate(zip(NAMES, pooler.scales)):
        idx = torch.where(levels == level)[0]
        expected = torch.ops.torchvision.roi_align(feats[key], rois[idx], scale, 7, 7, 2, True)
        torch.testing.assert_close(out[idx], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out, MultiScaleRoIAlign(NAMES, 7, 2)(feats, boxes, IMAGE_SHAPES), atol=1e-3)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_differentiable_pooler_gradients(dtype, tol):
    feats = OrderedDict((k, v.to(dtype)) for k, v in fpn_features().items())
    boxes = [b.to(dtype) for b in boxes_per_image()]
    grad_out = torch.randn(55, 4, 7, 7, generator=torch.Generator().manual_seed(3)).to(dtype)

    ref_feats = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in feats.items())
    ref_boxes = [b.clone().requires_grad_(True) for b in boxes]
    MultiScaleRoIAlign(NAMES, 7, 2)(ref_feats, ref_boxes, IMAGE_SHAPES).backward(grad_out)
    assert all(b.grad is None for b in ref_boxes)  # torchvision's kernel: no box gradient

    our_feats = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in feats.items())
    our_boxes = [b.clone().requires_grad_(True) for b in boxes]
    build("differentiable_roi_align")(our_feats, our_boxes, IMAGE_SHAPES).backward(grad_out)
    for key in NAMES:
        # float32: sample positions differ by rounding (~1e-6 px); gradients are O(1), hence rtol as well
        torch.testing.assert_close(our_feats[key].grad, ref_feats[key].grad, atol=tol, rtol=tol)
    assert our_feats["pool"].grad is None
    for b in our_boxes:
        assert b.grad is not None and (b.grad.abs().sum(1) > 0).float().mean() > 0.8


def test_single_level_and_op_consistency():
    feats, boxes = fpn_features(), boxes_per_image()
    pooler = ROI_POOLERS.build(Spec("differentiable_roi_align", {"sampling_ratio": 1}), featmap_names=["1"])
    out = pooler(feats, boxes, IMAGE_SHAPES)
    torch.testing.assert_close(out, roi_align(feats["1"], boxes, 7, 1 / 8, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, MultiScaleRoIAlign(["1"], 7, 1)(feats, boxes, IMAGE_SHAPES), atol=1e-5, rtol=0)
