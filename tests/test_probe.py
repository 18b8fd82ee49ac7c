"""Gradient-flow probe: every loss x component; which loss reaches which component in each mode."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rcnn_lab.models.builder import build_model, component_modules
from rcnn_lab.probe import LOSSES, grad_norms, probe
from tests.conftest import detach_vs_backprop

COMPONENTS = ["backbone.body", "backbone.fpn", "rpn.head.conv", "rpn.head.cls_logits", "rpn.head.bbox_pred",
              "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor"]
RPN_HEAD = ["rpn.head.conv", "rpn.head.cls_logits", "rpn.head.bbox_pred"]
ROI_HEADS = ["roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor"]
ROI_LOSSES = ["loss_classifier", "loss_box_reg", "loss_mask"]

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    configs, images, targets = detach_vs_backprop(tmp_path_factory.mktemp("probe"), "probe_test")
    assert configs["detach"].model.transform.min_size == 64
    return configs, images, targets


@pytest.fixture(scope="module")
def norms(setup):
    configs, images, targets = setup
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        out[name] = grad_norms(build_model(cfg.model), images, targets)
    return out


def test_every_loss_and_component(norms):
    for mode in ("detach", "backprop"):
        assert list(norms[mode]) == list(LOSSES)
        for loss in LOSSES:
            assert list(norms[mode][loss]) == COMPONENTS
            assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in norms[mode][loss].values())


def test_detach_roi_losses_give_zero_to_the_rpn_head(norms):
    for loss in ROI_LOSSES:
        for comp in RPN_HEAD:
            assert norms["detach"][loss][comp] == 0.0, (loss, comp)
        assert norms["detach"][loss]["backbone.fpn"] > 0


def test_backprop_roi_losses_reach_bbox_pred(norms):
    for loss in ROI_LOSSES:
        assert norms["backprop"][loss]["rpn.head.bbox_pred"] > 0, loss
        assert norms["backprop"][loss]["rpn.head.conv"] > 0, loss
        assert norms["backprop"][loss]["rpn.head.cls_logits"] == 0.0, loss


def test_rpn_losses_never_reach_the_roi_heads(norms):
    for mode in ("detach", "backprop"):
        for loss in ("loss_objectness", "loss_rpn_box_reg"):
            assert all(norms[mode][loss][comp] == 0.0 for comp in ROI_HEADS), (mode, loss)
        assert norms[mode]["loss_objectness"]["rpn.head.cls_logits"] > 0
        assert norms[mode]["loss_rpn_box_reg"]["rpn.head.bbox_pred"] > 0
        # and, in both modes, the RPN losses send the same gradient into the RPN head
        for comp in RPN_HEAD:
            assert norms[mode]["loss_objectness"][comp] == norms["detach"]["loss_objectness"][comp]


def test_norm_is_the_l2_norm_of_autograd_grad(setup):
    configs, images, targets = setup
    torch.manual_seed(0)
    model = build_model(configs["backprop"].model)
    torch.manual_seed(7)
    got = grad_norms(model, images, targets)
    torch.manual_seed(7)  # same RNG: same proposal sampling
    losses = model(images, targets)
    params = list(component_modules(model)["rpn.head.bbox_pred"].parameters())
    g = torch.autograd.grad(losses["loss_box_reg"], params)
    expected = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
    assert got["loss_box_reg"]["rpn.head.bbox_pred"] == pytest.approx(expected, rel=1e-5)


def test_grad_norms_leaves_the_model_and_rng_unchanged(setup):
    configs, images, targets = setup
    torch.manual_seed(0)
    model = build_model(configs["detach"].model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)  # BatchNorm statistics a train-mode forward would update
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    grad_norms(model, images, targets)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_probe_trains_between_batches_and_restores_the_callers_rng(setup):
    configs, _, _ = setup
    torch.manual_seed(3), random.seed(3)
    rng, py_rng = torch.get_rng_state(), random.getstate()
    one = probe(configs["detach"], steps=1)
    two = probe(configs["detach"], steps=2)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert list(two) == list(LOSSES) and all(list(two[k]) == COMPONENTS for k in LOSSES)
    assert all(two[loss][comp] == 0.0 for loss in ROI_LOSSES for comp in RPN_HEAD)
    # the first probe of both is the same seeded model and batch; the second batch follows a
    # training step, so the mean of two probes differs from the first alone
    assert two["loss_objectness"]["rpn.head.cls_logits"] != one["loss_objectness"]["rpn.head.cls_logits"]
    with pytest.raises(ValueError, match="steps"):
        probe(configs["detach"], steps=0)


def _backprop(configs, **rpn):
    """The backprop variant's model config with ``model.rpn`` fields replaced."""
    from dataclasses import replace

    model = configs["backprop"].model
    return replace(model, rpn=replace(model.rpn, **rpn))


@pytest.fixture(scope="module")
def variant_norms(setup):
    """Probe norms at initialisation (same seed, weights and batch as ``norms``) for scale / from variants."""
    configs, images, targets = setup
    out = {}
    for name, rpn in {"scale_0.25": {"proposal_gradient_scale": 0.25}, "scale_0.1": {"proposal_gradient_scale": 0.1},
                      "box": {"proposal_gradient_from": ["box"]}, "mask": {"proposal_gradient_from": ["mask"]}}.items():
        torch.manual_seed(0)
        out[name] = grad_norms(build_model(_backprop(configs, **rpn)), images, targets)
    return out


def test_scale_multiplies_the_roi_losses_norms_into_the_rpn_head_exactly(norms, variant_norms):
    full = norms["backprop"]
    for loss in ROI_LOSSES:
        assert full[loss]["rpn.head.bbox_pred"] > 0, loss
        for comp in ("rpn.head.bbox_pred", "rpn.head.conv"):  # conv hears the RoI losses only through bbox_pred
            # a power of two scales every float exactly: the norm is exactly 0.25x
            assert variant_norms["scale_0.25"][loss][comp] == 0.25 * full[loss][comp], (loss, comp)
            assert variant_norms["scale_0.1"][loss][comp] == pytest.approx(0.1 * full[loss][comp], rel=1e-5)
        assert variant_norms["scale_0.25"][loss]["rpn.head.cls_logits"] == 0.0
        # the heads' own gradients and the RPN losses are untouched (forward and sampling unchanged)
        for comp in ROI_HEADS:
            assert variant_norms["scale_0.25"][loss][comp] == full[loss][comp], (loss, comp)
    for loss in ("loss_objectness", "loss_rpn_box_reg"):
        assert variant_norms["scale_0.25"][loss] == full[loss]


def test_from_names_the_heads_whose_losses_reach_the_rpn_head(norms, variant_norms):
    full, mask_only, box_only = norms["backprop"], variant_norms["mask"], variant_norms["box"]
    for comp in RPN_HEAD:
        assert mask_only["loss_classifier"][comp] == 0.0 and mask_only["loss_box_reg"][comp] == 0.0, comp
        assert box_only["loss_mask"][comp] == 0.0, comp
    for comp in ("rpn.head.bbox_pred", "rpn.head.conv"):
        assert mask_only["loss_mask"][comp] == full["loss_mask"][comp] > 0
        assert box_only["loss_classifier"][comp] == full["loss_classifier"][comp] > 0
        assert box_only["loss_box_reg"][comp] == full["loss_box_reg"][comp] > 0
    # a detached pooler still trains the backbone and the FPN through the pooled features
    assert mask_only["loss_box_reg"]["backbone.fpn"] > 0 and box_only["loss_mask"]["backbone.fpn"] > 0
