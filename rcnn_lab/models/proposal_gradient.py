"""Proposal-gradient modes: ``detach`` (torchvision) vs ``backprop`` (non-approximate joint training).

torchvision's ``RegionProposalNetwork.forward`` decodes proposals from ``pred_bbox_deltas.detach()``
("approximate joint training", Ren et al.), so RoI-head losses never reach the RPN. In
``backprop`` mode the proposals keep their graph: the RoI heads pool features at box coordinates
that depend on the RPN's ``bbox_pred``, and a box-differentiable pooler carries the RoI losses
back into it. Matching, sampling and regression targets are still computed from *detached*
proposals: they are discrete choices or fixed regression goals; differentiating through them
would make the targets move with the prediction (a target should not chase its own estimate).
Ground-truth boxes appended to the proposals are constants.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers


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
    """RoIHeads that sample and build targets from detached proposals but pool at the live ones."""

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        sampled = super().subsample(labels)
        self._sampled_inds = sampled  # read back by select_training_samples below
        return sampled

    def select_training_samples(self, proposals, targets):
        detached = [p.detach() for p in proposals]
        _, matched_idxs, labels, regression_targets = super().select_training_samples(detached, targets)
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        live = [torch.cat((p, g))[i] for p, g, i in zip(proposals, gt_boxes, self._sampled_inds)]
        del self._sampled_inds
        return live, matched_idxs, labels, regression_targets
