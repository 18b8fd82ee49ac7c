"""The experiment schema. Every key a YAML file may hold is a field here; unknown keys fail.

Component fields hold ``{type: NAME, **kwargs}`` specs whose kwargs are checked against the
registered factory's signature (see ``rcnn_lab.registry``). Defaults reproduce torchvision's
``maskrcnn_resnet50_fpn``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from rcnn_lab.config.types import Spec, component, component_list
from rcnn_lab.errors import excerpt

Check = list[tuple[str, str]]  # (relative dotted key, message)


def _default(value):
    return field(default_factory=lambda: value)


def _unit(check: Check, key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        check.append((key, f"must be in [0, 1], got {value}"))


def _positive(check: Check, key: str, value: float) -> None:
    if value <= 0:
        check.append((key, f"must be positive, got {value}"))


AUTO = "auto"  # model.num_classes: auto
MAX_SIDE = 8192  # model.transform.min_size / max_size, in pixels (docs/configuration.md, "Limits")
MAX_BATCH = 1024  # data.batch_size and eval.batch_size (a global batch)


def _at_most(check: Check, key: str, value: float, limit: int, what: str) -> None:
    if value > limit:
        check.append((key, f"is {value:,}; the limit is {limit:,} {what}"))


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _plain_name(check: Check, key: str, value: str) -> None:
    """Names that become folders (outputs/NAME, artifacts/NAME) cannot leave the runs folder."""
    if not _NAME.fullmatch(value) or ".." in value:
        check.append((key, f"must be a plain name (letters, digits, '-', '_', '.'; at most 100; no '..'), "
                           f"got {excerpt(value)}; it names folders under the runs folder"))


@dataclass(frozen=True)
class TopN:
    train: int
    test: int

    def check(self) -> Check:
        out: Check = []
        _positive(out, "train", self.train)
        _positive(out, "test", self.test)
        return out


@dataclass(frozen=True)
class TransformConfig:
    """GeneralizedRCNNTransform: resize (a list of min sizes = random choice while training) and normalise."""

    min_size: int | list[int] = 800
    max_size: int = 1333
    image_mean: list[float] = _default([0.485, 0.456, 0.406])
    image_std: list[float] = _default([0.229, 0.224, 0.225])
    # the batch is padded to a multiple of this (torchvision: 32); 16 suits bodies whose coarsest level is stride 16
    size_divisible: int = 32

    def check(self) -> Check:
        out: Check = []
        _positive(out, "size_divisible", self.size_divisible)
        _at_most(out, "size_divisible", self.size_divisible, MAX_SIDE, "pixels (the batch is padded to a multiple of it)")
        sizes = self.min_size if isinstance(self.min_size, list) else [self.min_size]
        if not sizes:
            out.append(("min_size", "must not be empty"))
        for s in sizes:
            _positive(out, "min_size", s)
            _at_most(out, "min_size", s, MAX_SIDE, "pixels (images are resized to it)")
        _positive(out, "max_size", self.max_size)
        _at_most(out, "max_size", self.max_size, MAX_SIDE, "pixels (images are resized to it)")
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != 3:
                out.append((key, "needs 3 values (one per RGB channel)"))
        if any(not s > 0 for s in self.image_std):  # images are divided by it
            out.append(("image_std", f"must be > 0 for every channel (images are divided by it), got {self.image_std}"))
        return out


@dataclass(frozen=True)
class RPNConfig:
    head: component("rpn_head") = _default({"type": "conv", "conv_depth": 1})
    pre_nms_top_n: TopN = _default({"train": 2000, "test": 1000})
    post_nms_top_n: TopN = _default({"train": 2000, "test": 1000})
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    score_thresh: float = 0.0
    proposal_gradient: Literal["detach", "backprop"] = "detach"
    # backprop only: factor on the gradient the RoI heads send to the proposal coordinates (forward unchanged)
    proposal_gradient_scale: float = 1.0
    # backprop only: the RoI poolers that pool at the live proposals (the others get detached ones)
    proposal_gradient_from: list[Literal["box", "mask"]] = _default(["box", "mask"])

    def check(self) -> Check:
        out: Check = []
        for key in ("nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "score_thresh"):
            _unit(out, key, getattr(self, key))
        _positive(out, "batch_size_per_image", self.batch_size_per_image)
        if self.bg_iou_thresh > self.fg_iou_thresh:
            out.append(("bg_iou_thresh", f"must not exceed fg_iou_thresh ({self.fg_iou_thresh})"))
        out.extend(self._check_proposal_gradient())
        return out

    def _check_proposal_gradient(self) -> Check:
        scale, sources = self.proposal_gradient_scale, self.proposal_gradient_from
        if self.proposal_gradient == "detach":
            if scale != 1.0:
                return [("proposal_gradient_scale", "applies to proposal_gradient: backprop only (here detach, "
                         "where no RoI gradient reaches the proposals); remove it or set proposal_gradient: backprop")]
            if sorted(sources) != ["box", "mask"]:
                return [("proposal_gradient_from", "applies to proposal_gradient: backprop only (here detach); "
                         "remove it or set proposal_gradient: backprop")]
            return []
        out: Check = []
        if not math.isfinite(scale) or scale <= 0:
            out.append(("proposal_gradient_scale", f"must be a finite number > 0, got {scale}; "
                        "use e.g. 0.1, or proposal_gradient: detach for no gradient"))
        if not sources:
            out.append(("proposal_gradient_from", "must name at least one of box, mask; "
                        "use proposal_gradient: detach for none"))
        elif len(set(sources)) != len(sources):
            out.append(("proposal_gradient_from", f"names a pooler twice ({sources}); list box and/or mask once"))
        return out


@dataclass(frozen=True)
class RoIHeadsConfig:
    box_pooler: component("roi_pooler") = _default(
        {"type": "multiscale_roi_align", "output_size": 7, "sampling_ratio": 2}
    )
    box_head: component("box_head") = _default({"type": "two_mlp", "representation_size": 1024})
    box_predictor: component("box_predictor") = _default({"type": "fast_rcnn"})
    mask_pooler: component("roi_pooler") | None = _default(
        {"type": "multiscale_roi_align", "output_size": 14, "sampling_ratio": 2}
    )
    mask_head: component("mask_head") | None = _default(
        {"type": "conv_stack", "layers": [256, 256, 256, 256], "dilation": 1}
    )
    mask_predictor: component("mask_predictor") | None = _default({"type": "mask_rcnn", "dim_reduced": 256})
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: list[float] | None = None
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def check(self) -> Check:
        out: Check = []
        for key in ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "score_thresh", "nms_thresh"):
            _unit(out, key, getattr(self, key))
        _positive(out, "batch_size_per_image", self.batch_size_per_image)
        _positive(out, "detections_per_img", self.detections_per_img)
        if self.bbox_reg_weights is not None and len(self.bbox_reg_weights) != 4:
            out.append(("bbox_reg_weights", "needs 4 values (wx, wy, ww, wh)"))
        mask = {"mask_pooler": self.mask_pooler, "mask_head": self.mask_head, "mask_predictor": self.mask_predictor}
        if any(v is None for v in mask.values()) and any(v is not None for v in mask.values()):
            missing = next(k for k, v in mask.items() if v is None)
            out.append((missing, "mask_pooler, mask_head and mask_predictor are set or null together"))
        return out


@dataclass(frozen=True)
class ModelConfig:
    # 1 + the categories of data.train, or auto: that count, resolved once the data is read (engine.preflight)
    num_classes: int | Literal["auto"] = 91
    transform: TransformConfig = _default({})
    backbone: component("backbone") = _default({"type": "resnet_fpn", "depth": 50, "weights": None})
    anchor_generator: component("anchor_generator") = _default(
        {"type": "grid", "sizes": [[32], [64], [128], [256], [512]], "aspect_ratios": [[0.5, 1.0, 2.0]]}
    )
    rpn: RPNConfig = _default({})
    roi_heads: RoIHeadsConfig = _default({})
    # the whole detector's initial weights (engine/weights.py): null | coco | a torchvision weights name
    # (MaskRCNN_ResNet50_FPN_Weights.COCO_V1, ...) | /path/to/file.pth (state_dict or rcnn-lab checkpoint) | run:<run_id>
    weights: str | None = None

    def check(self) -> Check:
        out: Check = []
        if self.num_classes != AUTO and self.num_classes < 2:
            out.append(("num_classes", f"must be >= 2 (background + at least one class), got {self.num_classes}"))
        if self.weights is not None and not self.weights.strip():
            out.append(("weights", "is empty; use null, coco, a torchvision weights name, a file path or run:<run_id>"))
        elif self.weights is not None and self.weights.startswith("run:") and not self.weights[4:].strip():
            out.append(("weights", "run: needs a run id (run:<run_id>, as `rcnn-lab report` or the MLflow UI lists it)"))
        if (self.rpn.proposal_gradient == "backprop" and "mask" in self.rpn.proposal_gradient_from
                and self.roi_heads.mask_head is None):
            out.append(("rpn.proposal_gradient_from", "names mask but the model has no mask head "
                        "(roi_heads.mask_head is null); use [box]"))
        return out


@dataclass(frozen=True)
class DataConfig:
    train: component("dataset") = _default({"type": "shapes", "split": "train"})
    val: component("dataset") = _default({"type": "shapes", "split": "val"})
    transforms: component_list("transform") = _default([{"type": "hflip", "p": 0.5}])
    batch_size: int = 4
    num_workers: int = 0
    group_aspect_ratio: bool = False
    aspect_ratio_group_factor: int | None = None  # k: torchvision's 2k+2 bins and GroupedBatchSampler (data/loader.py)
    # under --nproc/torchrun: split each global batch over the ranks (global), or let each rank draw and group
    # its own share as torchvision's reference does (per_process: DistributedSampler + GroupedBatchSampler)
    sampler: Literal["global", "per_process"] = "global"

    def check(self) -> Check:
        out: Check = []
        _positive(out, "batch_size", self.batch_size)
        _at_most(out, "batch_size", self.batch_size, MAX_BATCH, "images per step (all processes together)")
        if self.num_workers < 0:
            out.append(("num_workers", "must be >= 0"))
        if self.aspect_ratio_group_factor is not None:
            if self.aspect_ratio_group_factor < 0:
                out.append(("aspect_ratio_group_factor", f"must be >= 0 or null, got {self.aspect_ratio_group_factor}"))
            elif not self.group_aspect_ratio:
                out.append(("aspect_ratio_group_factor", "takes effect with group_aspect_ratio: true; set that too, or null this"))
        if self.sampler == "per_process" and self.group_aspect_ratio and self.aspect_ratio_group_factor is None:
            out.append(("sampler", "per_process groups by aspect ratio only as torchvision does; set "
                        "aspect_ratio_group_factor (e.g. 3), or group_aspect_ratio: false"))
        return out


@dataclass(frozen=True)
class TrainConfig:
    iterations: int | None = 1000
    epochs: int | None = None  # instead of iterations: epochs x the training stream's batches per epoch
    optimizer: component("optimizer") = _default({"type": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4})
    lr_scheduler: component("lr_scheduler") = _default(
        {"type": "multistep", "milestones": [0.67, 0.89], "warmup_iters": 100}
    )
    clip_grad_norm: float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    device: str = "auto"
    seed: int = 0
    deterministic: bool = True
    log_every: int = 20
    checkpoint_every: int = 200
    eval_every: int = 0
    grad_probe_every: int = 0

    def check(self) -> Check:
        out: Check = []
        if (self.iterations is None) == (self.epochs is None):
            out.append(("epochs" if self.epochs is not None else "iterations",
                        "set one of train.iterations and train.epochs, and the other to null"))
        for key in ("iterations", "epochs"):
            if getattr(self, key) is not None:
                _positive(out, key, getattr(self, key))
        _positive(out, "log_every", self.log_every)
        for key in ("checkpoint_every", "eval_every", "grad_probe_every"):
            if getattr(self, key) < 0:
                out.append((key, "must be >= 0 (0 disables)"))
        if self.clip_grad_norm is not None:
            _positive(out, "clip_grad_norm", self.clip_grad_norm)
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            out.append(("device", f"expected auto, cpu, cuda or cuda:N, got {dev!r}"))
        return out


@dataclass(frozen=True)
class EvalConfig:
    iou_types: list[Literal["bbox", "segm"]] = _default(["bbox", "segm"])
    batch_size: int = 4
    max_images: int | None = None
    per_class: bool = True
    class_agnostic: bool = False  # also {bbox,segm}_agnostic_AP/AP50/AP75: how much of the gap is wrong labels
    gallery: int = 0  # draw this many fixed validation images (GT | predictions) at every evaluation, logged to MLflow

    def check(self) -> Check:
        out: Check = []
        _positive(out, "batch_size", self.batch_size)
        _at_most(out, "batch_size", self.batch_size, MAX_BATCH, "images per forward pass")
        if self.gallery < 0:
            out.append(("gallery", f"must be 0 (off) or a number of validation images, got {self.gallery}"))
        if self.max_images is not None and self.max_images <= 0:
            out.append(("max_images", f"must be a positive number of images or null (all), got {self.max_images}"))
        if not self.iou_types:
            out.append(("iou_types", "must name bbox and/or segm"))
        return out


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment: str | None = None
    log_checkpoint: bool = False
    log_every: int = 0
    async_logging: bool = True
    outage_buffer_mb: int = 256  # per run: unstored tracking writes kept on disk while the store is down

    def check(self) -> Check:
        out: Check = []
        _positive(out, "outage_buffer_mb", self.outage_buffer_mb)
        return out


@dataclass(frozen=True)
class RunConfig:
    """One fully resolved variant x seed: everything a training run reads."""

    name: str
    description: str = ""
    plugins: list[str] = _default([])
    model: ModelConfig = _default({})
    data: DataConfig = _default({})
    train: TrainConfig = _default({})
    eval: EvalConfig = _default({})
    tracking: TrackingConfig = _default({})

    def check(self) -> Check:
        out: Check = []
        _plain_name(out, "name", self.name)
        if self.tracking.experiment is not None:
            _plain_name(out, "tracking.experiment", self.tracking.experiment)
        if self.model.roi_heads.mask_head is None and "segm" in self.eval.iou_types:
            out.append(("eval.iou_types", "segm needs a mask head (model.roi_heads.mask_head is null); use [bbox]"))
        return out


def warnings(cfg: RunConfig) -> Check:
    """Settings that are valid but probably not what was meant: (dotted key, message)."""
    out: Check = []
    rpn = cfg.model.rpn
    for phase in ("train", "test"):
        pre, post = getattr(rpn.pre_nms_top_n, phase), getattr(rpn.post_nms_top_n, phase)
        if pre < post:
            out.append((f"model.rpn.post_nms_top_n.{phase}",
                        f"{post} exceeds pre_nms_top_n.{phase} ({pre}), which counts per feature level: NMS sees "
                        f"at most {pre} x levels boxes, so this cap may never apply; check the two are not swapped"))
    return out


# keys of an experiment file that are not part of a run's config
EXPERIMENT_KEYS = ("base", "variants", "grid", "seeds", "baseline", "search")

__all__ = ["RunConfig", "ModelConfig", "Spec", "EXPERIMENT_KEYS"]
