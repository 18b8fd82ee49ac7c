"""The model builder: the only place that turns model config into torchvision kwargs.

Parts are built from their registries, then assembled into a ``MaskRCNN`` (torchvision's class;
``AssembledMaskRCNN`` only skips its constructor's default-part logic).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from rcnn_lab.config.schema import AUTO, ModelConfig
from rcnn_lab.config.types import Spec
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.models.proposal_gradient import ProposalGradientRoIHeads, ProposalGradientRPN
from rcnn_lab.registry import (
    ANCHOR_GENERATORS,
    BACKBONES,
    BOX_HEADS,
    BOX_PREDICTORS,
    MASK_HEADS,
    MASK_PREDICTORS,
    ROI_POOLERS,
    RPN_HEADS,
    Registry,
)


class AssembledMaskRCNN(MaskRCNN):
    """torchvision ``MaskRCNN`` assembled from already-built parts."""

    def __init__(self, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module, transform: nn.Module):
        GeneralizedRCNN.__init__(self, backbone, rpn, roi_heads, transform)


def _build(registry: Registry, spec: Spec, path: str, **injected):
    return registry.build(spec, path, **injected)


def featmap_names(backbone: nn.Module) -> list[str]:
    """Names of the backbone's output maps (declared, or found with a tiny forward pass)."""
    names = getattr(backbone, "featmap_names", None)
    if names is not None:
        return list(names)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        device = next(backbone.parameters()).device
        out = backbone(torch.zeros(1, 3, 64, 64, device=device))
    backbone.train(was_training)
    return list(out.keys()) if isinstance(out, (dict, OrderedDict)) else ["0"]


def _resolution(pooler: nn.Module) -> tuple[int, int]:
    size = getattr(pooler, "output_size", 7)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


FINE_TUNE_DEFAULTS = {"trainable_layers": 3, "norm": "frozen_batchnorm"}


def backbone_spec(cfg: ModelConfig, path: str = "model") -> Spec:
    """The backbone spec to build: with detector weights (``model.weights``), torchvision's fine-tuning
    defaults fill what the YAML leaves unset (null): 3 trainable stages and frozen BatchNorm, as
    ``maskrcnn_resnet50_fpn(weights=...)`` decides it (``is_trained`` -> ``_validate_trainable_layers``
    default 3, ``FrozenBatchNorm2d``). Backbones whose factory takes no such argument are built as written."""
    spec = cfg.backbone
    if cfg.weights is None:
        return spec
    accepted = {p.name for p in BACKBONES.get(spec.type, f"{path}.backbone.type").params()}
    filled = {k: v for k, v in FINE_TUNE_DEFAULTS.items() if k in accepted and spec.kwargs.get(k) is None}
    if "norm" in filled and (cfg.weights == "coco_v2" or "_V2_Weights." in cfg.weights):
        filled["norm"] = "batchnorm"  # maskrcnn_resnet50_fpn_v2 / fasterrcnn_..._v2 keep BatchNorm2d in the body
    return Spec(spec.type, {**spec.kwargs, **filled}) if filled else spec


def build_for_weights(cfg: ModelConfig, path: str = "model") -> MaskRCNN:
    """The model ``build_model`` builds, without reading the backbone's own weights (``model.backbone.weights``):
    for detector weights that replace every tensor (``rcnn-lab predict``), so nothing is downloaded or read twice.
    The backbone keeps what its weights would have given it: torchvision's defaults for a trained body
    (``FINE_TUNE_DEFAULTS``: frozen BatchNorm, 3 trainable stages) where the YAML leaves them unset."""
    from dataclasses import replace

    spec = backbone_spec(cfg, path)
    if spec.kwargs.get("weights") is None:
        return build_model(cfg, path)
    accepted = {p.name for p in BACKBONES.get(spec.type, f"{path}.backbone.type").params()}
    filled = {k: v for k, v in FINE_TUNE_DEFAULTS.items() if k in accepted and spec.kwargs.get(k) is None}
    return build_model(replace(cfg, backbone=Spec(spec.type, {**spec.kwargs, **filled, "weights": None})), path)


def build_model(cfg: ModelConfig, path: str = "model") -> MaskRCNN:
    """Build the Mask R-CNN described by ``cfg`` (a validated ``ModelConfig``).

    ``model.weights`` is not loaded here (``engine/weights.py`` does, after seeding and building);
    it only sets the backbone's fine-tuning defaults (:func:`backbone_spec`). ``num_classes: auto`` must be
    resolved from the data first (``engine.preflight.RunInputs.resolve``).
    """
    if cfg.num_classes == AUTO:
        raise ConfigError([Problem(f"{path}.num_classes", "is auto: the number comes from data.train's categories once "
                                   "the data is read (rcnn-lab run does it; in code: engine.preflight.prepare(config)"
                                   ".resolve(config)); or set a number")])
    backbone = _build(BACKBONES, backbone_spec(cfg, path), f"{path}.backbone")
    names = featmap_names(backbone)
    anchors = _build(ANCHOR_GENERATORS, cfg.anchor_generator, f"{path}.anchor_generator")
    levels = len(getattr(anchors, "sizes", names))
    if levels != len(names):
        raise ConfigError([Problem(
            f"{path}.anchor_generator.sizes",
            f"has {levels} size lists but backbone '{cfg.backbone.type}' gives {len(names)} feature maps "
            f"({', '.join(names)}); give one list per feature map",
        )])
    per_level = anchors.num_anchors_per_location()
    if len(set(per_level)) != 1:
        raise ConfigError([Problem(
            f"{path}.anchor_generator",
            f"anchors per location differ across levels ({per_level}); the RPN head is shared across "
            "levels, so every level needs the same count of sizes x aspect ratios",
        )])
    # parameters are initialised in torchvision's order (MaskRCNN builds the mask parts before
    # FasterRCNN builds the RPN head and the box parts), so the same seed gives torchvision's weights
    h = cfg.roi_heads
    roi_names = [n for n in names if n != "pool"]
    mask_parts = {}
    if h.mask_head is not None:
        mask_parts["mask_roi_pool"] = _build(ROI_POOLERS, h.mask_pooler, f"{path}.roi_heads.mask_pooler", featmap_names=roi_names)
        mask_head = _build(MASK_HEADS, h.mask_head, f"{path}.roi_heads.mask_head", in_channels=backbone.out_channels)
        mask_parts["mask_head"] = mask_head
        mask_parts["mask_predictor"] = _build(MASK_PREDICTORS, h.mask_predictor, f"{path}.roi_heads.mask_predictor", in_channels=mask_head.out_channels, num_classes=cfg.num_classes)
    rpn_head = _build(RPN_HEADS, cfg.rpn.head, f"{path}.rpn.head", in_channels=backbone.out_channels, num_anchors=per_level[0])

    r = cfg.rpn
    backprop = r.proposal_gradient == "backprop"
    rpn_cls = ProposalGradientRPN if backprop else RegionProposalNetwork
    rpn = rpn_cls(
        anchors, rpn_head, r.fg_iou_thresh, r.bg_iou_thresh, r.batch_size_per_image, r.positive_fraction,
        {"training": r.pre_nms_top_n.train, "testing": r.pre_nms_top_n.test},
        {"training": r.post_nms_top_n.train, "testing": r.post_nms_top_n.test},
        r.nms_thresh, score_thresh=r.score_thresh,
    )

    box_pool = _build(ROI_POOLERS, h.box_pooler, f"{path}.roi_heads.box_pooler", featmap_names=roi_names)
    box_head = _build(BOX_HEADS, h.box_head, f"{path}.roi_heads.box_head", in_channels=backbone.out_channels, resolution=_resolution(box_pool))
    box_predictor = _build(BOX_PREDICTORS, h.box_predictor, f"{path}.roi_heads.box_predictor", in_channels=box_head.out_channels, num_classes=cfg.num_classes)
    heads_cls, extra = RoIHeads, {}
    if backprop:
        heads_cls = ProposalGradientRoIHeads
        extra = {"gradient_scale": r.proposal_gradient_scale, "gradient_from": tuple(r.proposal_gradient_from)}
    roi_heads = heads_cls(
        box_pool, box_head, box_predictor, h.fg_iou_thresh, h.bg_iou_thresh, h.batch_size_per_image,
        h.positive_fraction, h.bbox_reg_weights, h.score_thresh, h.nms_thresh, h.detections_per_img, **mask_parts,
        **extra,
    )
    t = cfg.transform
    min_size = tuple(t.min_size) if isinstance(t.min_size, list) else t.min_size
    transform = GeneralizedRCNNTransform(min_size, t.max_size, list(t.image_mean), list(t.image_std), size_divisible=t.size_divisible)
    return AssembledMaskRCNN(backbone, rpn, roi_heads, transform)


def proposal_gradient_problems(cfg: ModelConfig, path: str = "model") -> list[Problem]:
    """``backprop`` needs the poolers of ``proposal_gradient_from`` to be differentiable with respect to boxes."""
    if cfg.rpn.proposal_gradient != "backprop":
        return []
    out = []
    for key in ("box_pooler", "mask_pooler"):
        if key.split("_")[0] not in cfg.rpn.proposal_gradient_from:
            continue  # pools at detached proposals: any pooler will do
        spec = getattr(cfg.roi_heads, key)
        if spec is None:
            continue
        entry = ROI_POOLERS.get(spec.type)
        if not entry.meta.get("box_gradient", False):
            diff = [n for n in ROI_POOLERS.names() if ROI_POOLERS.get(n).meta.get("box_gradient")]
            out.append(Problem(
                f"{path}.rpn.proposal_gradient",
                f"backprop needs roi_heads.{key} to pass gradients to box coordinates, but '{spec.type}' "
                f"(torchvision's C++ roi_align) returns none for them; use type: {' or '.join(diff) or 'a box-differentiable pooler'}",
            ))
    return out


AUTO_STAND_IN = 2  # num_classes: auto before the data is read: any count builds the same parts but the predictors' rows


def stand_in(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` buildable before the data is read: ``num_classes: auto`` stands in as :data:`AUTO_STAND_IN` (for
    checks and counts on the meta device; a run builds the number ``engine.preflight`` resolves)."""
    from dataclasses import replace

    return replace(cfg, num_classes=AUTO_STAND_IN) if cfg.num_classes == AUTO else cfg


def meta_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as the meta-device build gets it (``check_model``, the counts of ``validate`` and ``inspect``):
    ``stand_in``, and the backbone's ``weights`` kept only where its factory checks them there without a download
    or reading a file whole (registered with ``checks_weights_on_meta``, as ``models.backbones`` does) and the
    file exists; any other backbone (a plugin's) is built without them."""
    from dataclasses import replace
    from pathlib import Path

    meta_cfg, spec = stand_in(cfg), cfg.backbone
    weights = spec.kwargs.get("weights")
    checks = spec.type in BACKBONES and BACKBONES.get(spec.type).meta.get("checks_weights_on_meta", False)
    if weights is None or (checks and (weights == "imagenet" or Path(str(weights)).expanduser().is_file())):
        return meta_cfg
    return replace(meta_cfg, backbone=Spec(spec.type, {**spec.kwargs, "weights": None}))


def check_model(cfg: ModelConfig, path: str = "model") -> list[Problem]:
    """Build ``cfg`` on the meta device (no memory, no downloads; ``meta_config``) and return its problems."""
    return meta_model(cfg, path)[1]


def meta_model(cfg: ModelConfig, path: str = "model") -> tuple[MaskRCNN | None, list[Problem]]:
    """:func:`check_model`'s build: (the model on the meta device, None where it could not be built; its problems)."""
    model, problems = None, proposal_gradient_problems(cfg, path)
    weights = cfg.backbone.kwargs.get("weights")
    if weights not in (None, "imagenet"):
        from pathlib import Path

        if not Path(str(weights)).expanduser().is_file():
            problems.append(Problem(f"{path}.backbone.weights", f"weights file {weights!r} not found; use null, imagenet or an existing path"))
    try:
        with torch.device("meta"):
            model = build_model(meta_config(cfg), path)
    except ConfigError as exc:
        problems.extend(exc.problems)
    return model, problems


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_groups(model: MaskRCNN) -> dict[str, int]:
    """Parameter count per component (the groups the gradient probe reports too)."""
    return {name: count_parameters(mod) for name, mod in component_modules(model).items()}


def component_modules(model: MaskRCNN) -> dict[str, nn.Module]:
    """Component groups: backbone body, FPN, RPN head parts, box head/predictor, mask head/predictor."""
    out: dict[str, nn.Module] = {}
    bb = model.backbone
    if hasattr(bb, "body") and hasattr(bb, "fpn"):
        out["backbone.body"], out["backbone.fpn"] = bb.body, bb.fpn
    else:
        out["backbone"] = bb
    head = model.rpn.head
    if all(hasattr(head, n) for n in ("conv", "cls_logits", "bbox_pred")):
        out["rpn.head.conv"], out["rpn.head.cls_logits"], out["rpn.head.bbox_pred"] = head.conv, head.cls_logits, head.bbox_pred
    else:
        out["rpn.head"] = head
    rh = model.roi_heads
    out["roi_heads.box_head"], out["roi_heads.box_predictor"] = rh.box_head, rh.box_predictor
    if rh.mask_head is not None:
        out["roi_heads.mask_head"], out["roi_heads.mask_predictor"] = rh.mask_head, rh.mask_predictor
    return out
