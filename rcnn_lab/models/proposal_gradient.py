"""Proposal-gradient modes: ``detach`` (torchvision) vs ``backprop`` (non-approximate joint training).

torchvision's ``RegionProposalNetwork.forward`` decodes proposals from ``pred_bbox_deltas.detach()``
("approximate joint training", Ren et al.), so RoI-head losses never reach the RPN. In
``backprop`` mode the proposals keep their graph: the RoI heads pool features at box coordinates
that depend on the RPN's ``bbox_pred``, and a box-differentiable pooler carries the RoI losses
back into it. Pooling is the only new gradient path:

* matching, fg/bg sampling, box-regression targets and mask targets are computed from *detached*
  proposals (a target must not be a function of the prediction it trains, or a loss could be
  lowered by moving its target; matching and sampling are discrete anyway);
* ground-truth boxes appended to the proposals are detached constants;
* proposal scores are detached by torchvision's ``filter_proposals`` (top-k and NMS are discrete),
  so ``rpn.head.cls_logits`` still learns from the RPN loss alone.

Two knobs weaken that path without touching the forward pass:

* ``gradient_scale`` multiplies the gradient that reaches the proposal coordinates from the RoI
  heads (:class:`ScaleGradient`: identity forward, ``scale * grad`` backward);
* ``gradient_from`` names the poolers that pool at the live proposals (``box``, ``mask``); the
  others pool at detached copies, so their losses reach the RPN only through the shared features.

The forward values (losses, detections) are those of ``detach`` mode: only the graph differs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass (the same tensor values, bit for bit); multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` whose gradient is multiplied by ``scale`` on the way back (``x`` itself when ``scale == 1``)."""
    return x if scale == 1.0 else ScaleGradient.apply(x, scale)


class ProposalGradientRPN(RegionProposalNetwork):
    """RegionProposalNetwork whose proposals are decoded from non-detached box deltas."""

    def forward(self, images, features, targets=None):
        # torchvision's forward, without ``pred_bbox_deltas.detach()`` before decoding
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas, anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses


class ProposalGradientRoIHeads(RoIHeads):
    """RoIHeads that match, sample and build targets from detached proposals but pool at the live ones.

    Evaluation is torchvision's ``RoIHeads.forward`` unchanged; training is the same computation
    with the mask targets cropped at detached proposals. Keypoint heads are not supported.

    ``gradient_scale`` multiplies the gradient the RoI losses send to the proposal coordinates;
    ``gradient_from`` (``"box"``, ``"mask"``) names the poolers that get the live proposals, the
    others get detached ones. The remaining arguments are torchvision's ``RoIHeads``'.
    """

    def __init__(self, *args, gradient_scale: float = 1.0, gradient_from: tuple[str, ...] = ("box", "mask"),
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not gradient_scale > 0 or gradient_scale == float("inf"):
            raise ValueError(f"gradient_scale must be a finite number > 0, got {gradient_scale}")
        unknown = set(gradient_from) - {"box", "mask"}
        if unknown or not gradient_from:
            raise ValueError(f"gradient_from must name box and/or mask, got {list(gradient_from)}")
        self.gradient_scale = float(gradient_scale)
        self.gradient_from = tuple(gradient_from)

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        sampled = super().subsample(labels)
        self._sampled_inds = sampled  # read back by select_training_samples below
        return sampled

    def select_training_samples(self, proposals, targets):
        """torchvision's sampling on detached proposals; returns the sampled *live* proposals.

        The regression targets are torchvision's, encoded from the detached proposals and GT boxes;
        the returned proposals are the same boxes, still attached to the RPN's graph, with the
        (detached) ground-truth boxes appended as constants.
        """
        detached = [p.detach() for p in proposals]
        targets = [{**t, "boxes": t["boxes"].detach()} for t in targets]
        _, matched_idxs, labels, regression_targets = super().select_training_samples(detached, targets)
        sampled, self._sampled_inds = self._sampled_inds, None
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        live = [torch.cat((p, g))[i] for p, g, i in zip(proposals, gt_boxes, sampled)]
        return live, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if self.has_keypoint():
            raise NotImplementedError("proposal_gradient: backprop does not support keypoint heads")
        if targets is None:
            raise ValueError("targets should not be None")
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")

        proposals = [scale_gradient(p, self.gradient_scale) for p in proposals]
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_proposals = proposals if "box" in self.gradient_from else [p.detach() for p in proposals]
        box_features = self.box_head(self.box_roi_pool(features, box_proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] if "mask" in self.gradient_from else p[i].detach() for p, i in zip(proposals, pos)]
            pos_matched_idxs = [m[i] for m, i in zip(matched_idxs, pos)]
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            gt_masks = [t["masks"] for t in targets]
            gt_labels = [t["labels"] for t in targets]
            # mask targets: the GT masks cropped at the detached proposals
            losses["loss_mask"] = maskrcnn_loss(mask_logits, [p.detach() for p in mask_proposals], gt_masks,
                                                gt_labels, pos_matched_idxs)
        return [], losses
