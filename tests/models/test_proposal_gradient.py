"""``model.rpn.proposal_gradient``: detach (torchvision) vs backprop (RoI losses reach the RPN's bbox_pred).

A tiny Mask R-CNN (resnet18-FPN, 64 px) with the differentiable pooler for both box and mask
heads, so that the two modes differ only in whether the proposals keep their graph.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

import rcnn_lab.models.proposal_gradient as pg
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.errors import ConfigError
from rcnn_lab.models.builder import build_model
from tests.conftest import FIXTURES, detach_vs_backprop

ROI_LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask")
RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")
RPN_HEAD = ("conv", "cls_logits", "bbox_pred")

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(detach config, backprop config, images, targets)."""
    configs, images, targets = detach_vs_backprop(tmp_path_factory.mktemp("pg"), "proposal_gradient_test")
    return configs["detach"], configs["backprop"], images, targets


def twin_models(setup):
    """A detach model and a backprop model with the same weights."""
    detach, backprop, _, _ = setup
    torch.manual_seed(0)
    md = build_model(detach.model)
    mb = build_model(backprop.model)
    mb.load_state_dict(md.state_dict())
    return md, mb


def rpn_head_params(model) -> dict[str, torch.Tensor]:
    return {n: getattr(model.rpn.head, n)[0][0].weight if n == "conv" else getattr(model.rpn.head, n).weight
            for n in RPN_HEAD}


def grads(loss, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    g = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return dict(zip(params, g))


def is_zero(g) -> bool:
    return g is None or not g.any()


@pytest.fixture(scope="module")
def trained_forward(setup):
    """One training-mode forward of each twin on the same batch with the same RNG state."""
    _, _, images, targets = setup
    md, mb = twin_models(setup)
    out = {}
    for name, model in (("detach", md), ("backprop", mb)):
        model.train()
        torch.manual_seed(1)
        losses = model(images, targets)
        out[name] = (model, losses, torch.get_rng_state())
    return out


def test_builder_picks_the_mode_classes(trained_forward):
    md, mb = trained_forward["detach"][0], trained_forward["backprop"][0]
    assert type(md.rpn) is RegionProposalNetwork and type(md.roi_heads) is RoIHeads
    assert type(mb.rpn) is pg.ProposalGradientRPN and type(mb.roi_heads) is pg.ProposalGradientRoIHeads


def test_forward_losses_and_sampling_are_identical(trained_forward):
    (_, ld, rng_d), (_, lb, rng_b) = trained_forward["detach"], trained_forward["backprop"]
    assert set(ld) == set(lb) == set(ROI_LOSSES + RPN_LOSSES)
    for k in ld:
        assert torch.equal(ld[k].detach(), lb[k].detach()), k
    # both modes drew the same random numbers (RPN and RoI fg/bg sampling): same samples
    assert torch.equal(rng_d, rng_b)


def test_backprop_roi_losses_reach_bbox_pred_but_not_cls_logits(trained_forward):
    mb, lb, _ = trained_forward["backprop"]
    params = rpn_head_params(mb)
    for loss in ROI_LOSSES:
        g = grads(lb[loss], params)
        assert g["bbox_pred"] is not None and g["bbox_pred"].abs().sum() > 0, loss
        assert g["conv"] is not None and g["conv"].abs().sum() > 0, loss  # through bbox_pred
        assert is_zero(g["cls_logits"]), loss  # scores only rank proposals (top-k, NMS): detached


def test_detach_roi_losses_give_exactly_zero_to_the_rpn_head(trained_forward):
    md, ld, _ = trained_forward["detach"]
    for loss in ROI_LOSSES:
        for name, g in grads(ld[loss], rpn_head_params(md)).items():
            assert is_zero(g), (loss, name)


def test_rpn_losses_give_the_same_gradients_in_both_modes(trained_forward):
    (md, ld, _), (mb, lb, _) = trained_forward["detach"], trained_forward["backprop"]
    for loss in RPN_LOSSES:
        gd, gb = grads(ld[loss], rpn_head_params(md)), grads(lb[loss], rpn_head_params(mb))
        for name in RPN_HEAD:
            assert (gd[name] is None) == (gb[name] is None), (loss, name)
            if gd[name] is not None:
                torch.testing.assert_close(gd[name], gb[name], rtol=0, atol=0)


def test_training_samples_use_detached_proposals_and_constant_gt(setup):
    _, _, _, targets = setup
    md, mb = twin_models(setup)
    md.train(), mb.train()
    g = torch.Generator().manual_seed(3)
    proposals = []
    for _ in targets:
        xy = torch.rand(40, 2, generator=g) * 40
        proposals.append(torch.cat([xy, xy + 4 + torch.rand(40, 2, generator=g) * 20], 1).requires_grad_())
    gt = [t["boxes"].clone().requires_grad_() for t in targets]
    live_targets = [{**t, "boxes": b} for t, b in zip(targets, gt)]

    torch.manual_seed(5)
    live, idxs, labels, reg = mb.roi_heads.select_training_samples(proposals, live_targets)
    torch.manual_seed(5)
    ref = RoIHeads.select_training_samples(md.roi_heads, [p.detach() for p in proposals], targets)

    for a, b in zip((live, idxs, labels, reg), ref):
        assert all(torch.equal(x.detach(), y) for x, y in zip(a, b))
    assert not any(r.requires_grad for r in reg)  # targets are constants, not functions of the proposals
    n_gt = 0
    for p, g_boxes, boxes in zip(proposals, gt, live):
        is_gt = (boxes.detach()[:, None, :] == g_boxes.detach()[None]).all(-1).any(-1)
        n_gt += int(is_gt.sum())
        gp, gg = torch.autograd.grad(boxes[is_gt].sum(), [p, g_boxes], retain_graph=True, allow_unused=True)
        assert is_zero(gp) and gg is None  # appended GT boxes: detached constants
        gp, = torch.autograd.grad(boxes[~is_gt].sum(), [p])
        assert gp.abs().sum() > 0  # sampled proposals keep their graph
    assert n_gt > 0


def test_mask_targets_are_cropped_at_detached_proposals(setup, monkeypatch):
    _, _, images, targets = setup
    _, mb = twin_models(setup)
    seen = {}
    loss_fn = pg.maskrcnn_loss

    def spy(mask_logits, proposals, *args):
        seen["targets_at"] = [p.requires_grad for p in proposals]
        return loss_fn(mask_logits, proposals, *args)

    monkeypatch.setattr(pg, "maskrcnn_loss", spy)
    def pooled_at(module, args):
        seen["pooled_at"] = [b.requires_grad for b in args[1]]

    mb.roi_heads.mask_roi_pool.register_forward_pre_hook(pooled_at)
    mb.train()
    losses = mb(images, targets)
    assert seen["pooled_at"] and all(seen["pooled_at"])
    assert seen["targets_at"] and not any(seen["targets_at"])
    assert losses["loss_mask"].requires_grad


def test_eval_detections_identical(setup):
    _, _, images, _ = setup
    md, mb = twin_models(setup)
    md.eval(), mb.eval()
    dd, db = md(images), mb(images)
    assert sum(len(d["boxes"]) for d in dd) > 0
    for a, b in zip(dd, db):
        assert set(a) == set(b) == {"boxes", "labels", "scores", "masks"}
        for k in a:
            assert torch.equal(a[k].detach(), b[k].detach()), k


@pytest.mark.parametrize("overrides, poolers", [
    ([], ["box_pooler", "mask_pooler"]),
    (["model.roi_heads.box_pooler.type=differentiable_roi_align"], ["mask_pooler"]),
])
def test_backprop_with_cpp_pooler_is_a_config_error(overrides, poolers):
    with pytest.raises(ConfigError) as exc:
        load_experiment(FIXTURES / "configs" / "backprop_cpp_pooler.yaml", overrides)
    problems = exc.value.problems
    assert [p.path for p in problems] == ["model.rpn.proposal_gradient"] * len(poolers)
    for p, key in zip(problems, poolers):
        assert f"roi_heads.{key}" in p.message and "returns none for them" in p.message
        assert "'multiscale_roi_align'" in p.message and "differentiable_roi_align" in p.message
        assert p.file.endswith("backprop_cpp_pooler.yaml")


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = pg.scale_gradient(x, 0.1)
    assert torch.equal(y, x) and y.grad_fn is not None
    (y * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, 0.1 * torch.arange(4.0).expand(5, 4), rtol=0, atol=0)
    assert pg.scale_gradient(x, 1.0) is x  # the default adds no node to the graph


@pytest.mark.parametrize("rpn", [{"proposal_gradient_scale": 0.1}, {"proposal_gradient_from": ["box"]},
                                 {"proposal_gradient_from": ["mask"]}])
def test_scale_and_from_leave_the_forward_pass_bit_identical(setup, trained_forward, rpn):
    from dataclasses import replace

    _, backprop, images, targets = setup
    md, ld, rng_d = trained_forward["detach"]
    model = build_model(replace(backprop.model, rpn=replace(backprop.model.rpn, **rpn)))
    model.load_state_dict(md.state_dict())
    model.train()
    torch.manual_seed(1)
    losses = model(images, targets)
    assert all(torch.equal(ld[k].detach(), losses[k].detach()) for k in ld)
    assert torch.equal(torch.get_rng_state(), rng_d)
    assert (model.roi_heads.gradient_scale, model.roi_heads.gradient_from) == (
        rpn.get("proposal_gradient_scale", 1.0), tuple(rpn.get("proposal_gradient_from", ["box", "mask"])))


BACKPROP = "model.rpn.proposal_gradient=backprop"


@pytest.mark.parametrize("overrides, key, message", [
    (["model.rpn.proposal_gradient_scale=0.1"], "proposal_gradient_scale", "applies to proposal_gradient: backprop only"),
    (["model.rpn.proposal_gradient_from=[box]"], "proposal_gradient_from", "applies to proposal_gradient: backprop only"),
    ([BACKPROP, "model.rpn.proposal_gradient_scale=0"], "proposal_gradient_scale", "must be a finite number > 0, got 0.0"),
    ([BACKPROP, "model.rpn.proposal_gradient_scale=-0.5"], "proposal_gradient_scale", "must be a finite number > 0"),
    ([BACKPROP, "model.rpn.proposal_gradient_scale=.nan"], "proposal_gradient_scale", "must be a finite number"),
    ([BACKPROP, "model.rpn.proposal_gradient_scale=.inf"], "proposal_gradient_scale", "must be a finite number"),
    ([BACKPROP, "model.rpn.proposal_gradient_scale=small"], "proposal_gradient_scale", "expected float"),
    ([BACKPROP, "model.rpn.proposal_gradient_from=[]"], "proposal_gradient_from", "at least one of box, mask"),
    ([BACKPROP, "model.rpn.proposal_gradient_from=[box, box]"], "proposal_gradient_from", "names a pooler twice"),
    ([BACKPROP, "model.rpn.proposal_gradient_from=[box, cls]"], "proposal_gradient_from[1]", "expected one of 'box', 'mask'"),
    ([BACKPROP, "model.roi_heads.mask_pooler=null", "model.roi_heads.mask_head=null",
      "model.roi_heads.mask_predictor=null", "eval.iou_types=[bbox]"], "proposal_gradient_from", "no mask head"),
])
def test_invalid_scale_and_from_fail_at_load_at_their_key(tmp_path, overrides, key, message):
    from tests.conftest import DIFF_POOLERS, TINY_MODEL

    path = tmp_path / "exp.yaml"
    path.write_text("name: pg_keys\n" + TINY_MODEL)
    with pytest.raises(ConfigError) as exc:
        load_experiment(path, DIFF_POOLERS + overrides)
    assert [p.path for p in exc.value.problems] == [f"model.rpn.{key}"]
    assert message in exc.value.problems[0].message and "\n" not in exc.value.problems[0].message


def test_a_cpp_pooler_is_fine_where_the_proposals_are_detached():
    # from: [box] pools the masks at detached proposals, so the mask pooler needs no box gradient
    exp = load_experiment(FIXTURES / "configs" / "backprop_cpp_pooler.yaml", [
        "model.roi_heads.box_pooler.type=differentiable_roi_align", "model.rpn.proposal_gradient_from=[box]"])
    assert exp.variants[0].config.model.rpn.proposal_gradient_from == ["box"]
    with pytest.raises(ConfigError, match="roi_heads.box_pooler"):
        load_experiment(FIXTURES / "configs" / "backprop_cpp_pooler.yaml", [
            "model.roi_heads.mask_pooler.type=differentiable_roi_align", "model.rpn.proposal_gradient_from=[box]"])


def test_round_2_experiment_file_scans_the_scale_and_shares_one_best_scale():
    from tests.conftest import EXPERIMENTS

    exp = load_experiment(EXPERIMENTS / "proposal_gradient_scale.yaml")
    rpn = {v.name: v.config.model.rpn for v in exp.variants}
    assert exp.baseline.name == "detach" and exp.seeds == [0, 1, 2] and len(rpn) == 10
    assert [(r.proposal_gradient, r.proposal_gradient_scale) for n, r in rpn.items() if n.startswith("scale_")] == [
        ("backprop", s) for s in (0.01, 0.03, 0.1, 0.3, 1.0)]
    best = {rpn[n].proposal_gradient_scale for n in ("box_only", "mask_only", "best_2x")}
    assert len(best) == 1 and best <= {0.01, 0.03, 0.1, 0.3, 1.0}  # one value, written once (a YAML anchor)
    assert (rpn["box_only"].proposal_gradient_from, rpn["mask_only"].proposal_gradient_from) == (["box"], ["mask"])
    iterations = {v.name: v.config.train.iterations for v in exp.variants}
    assert iterations["detach_2x"] == iterations["best_2x"] == 2 * iterations["detach"]
    assert rpn["detach_2x"].proposal_gradient == "detach"
