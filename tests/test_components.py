"""Every registered component, built-in or plugin, passes a tiny CPU smoke test for its family.

The parameter list is read from the registries (after loading ``registry/`` plugins), so new
components are covered without touching this file. A family without a rule in ``RULES`` fails
``test_every_family_has_a_smoke_rule``; a component with a required argument this file cannot
supply fails with a message saying where to add one (``REQUIRED``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from rcnn_lab.config.types import convert
from rcnn_lab.models.builder import _resolution
from rcnn_lab.plugins import load_plugins
from rcnn_lab.registry import FAMILIES, Entry

load_plugins()  # the project's registry/*.py

IMAGE = 64  # input side for backbones and poolers
C, K, NUM_CLASSES = 8, 3, 3  # feature channels, RoIs, classes (background included)

# Small values for heavy defaults, applied when the factory has the argument and the value fits its annotation.
SMALL = {
    "depth": 18, "weights": None, "num_images": 4, "max_images": 4, "image_size": 64,
    "representation_size": 32, "conv_layers": [16], "fc_layers": [32], "layers": [16], "channels": 16,
    "dim_reduced": 16,
}
# Required arguments with no sensible generic value: (family, name) -> kwargs (a callable gets the shared ``ctx``).
REQUIRED = {
    ("dataset", "coco"): lambda ctx: {"images": str(ctx["coco"] / "images"),
                                      "annotations": str(ctx["coco"] / "annotations.json")},
    ("transform", "resize_range"): lambda ctx: {"min_size": 48, "max_size": 96},
}


def kwargs_for(entry: Entry, ctx: dict) -> dict:
    required = REQUIRED.get((entry.family, entry.name))
    kwargs = dict(required(ctx)) if required else {}
    for p in entry.params():
        if p.name in kwargs:
            continue
        if p.name in SMALL:
            problems: list = []
            value = convert(SMALL[p.name], p.annotation, p.name, problems)
            if not problems:
                kwargs[p.name] = value
                continue
        if p.required:
            pytest.fail(f"{entry.family} '{entry.name}' requires '{p.name}'; add a value to REQUIRED in {__file__}")
    return kwargs


def build(entry: Entry, ctx: dict, **injected):
    return entry.factory(**kwargs_for(entry, ctx), **{k: v for k, v in injected.items() if k in entry.inject})


def backward_reaches_parameters(module: nn.Module, output) -> None:
    tensors = [output] if torch.is_tensor(output) else [t for t in (output.values() if isinstance(output, dict) else output)]
    flat = [x for t in tensors for x in (t if isinstance(t, (list, tuple)) else [t])]
    sum(x.float().sum() for x in flat).backward()
    params = [p for p in module.parameters() if p.requires_grad]
    assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def features(levels: int, channels: int = C) -> list[torch.Tensor]:
    """Feature maps at strides 4, 8, 16... of an IMAGE x IMAGE input."""
    return [torch.rand(1, channels, max(1, IMAGE // 2 ** (2 + i)), max(1, IMAGE // 2 ** (2 + i))) for i in range(levels)]


ROIS = [torch.tensor([[4.0, 4.0, 40.0, 36.0], [10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 63.0, 63.0]])]


# --- one rule per family -------------------------------------------------------------------------

def smoke_backbone(entry, ctx):
    model = build(entry, ctx).eval()
    out = model(torch.rand(1, 3, IMAGE, IMAGE))
    assert isinstance(out, OrderedDict) and len(out) >= 1
    assert isinstance(model.out_channels, int)
    for name, fmap in out.items():
        assert fmap.shape[:2] == (1, model.out_channels), name
        assert fmap.shape[-1] < IMAGE and torch.isfinite(fmap).all(), name
    model.train()
    backward_reaches_parameters(model, model(torch.rand(2, 3, IMAGE, IMAGE)))


def smoke_anchor_generator(entry, ctx):
    gen = build(entry, ctx)
    per_level = gen.num_anchors_per_location()
    maps = features(len(per_level))
    images = ImageList(torch.rand(2, 3, IMAGE, IMAGE), [(IMAGE, IMAGE), (IMAGE - 8, IMAGE)])
    anchors = gen(images, maps)
    total = sum(m.shape[-2] * m.shape[-1] * a for m, a in zip(maps, per_level))
    assert len(anchors) == 2
    for a in anchors:
        assert a.shape == (total, 4) and torch.isfinite(a).all()
        assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()


def smoke_rpn_head(entry, ctx):
    head = build(entry, ctx, in_channels=C, num_anchors=3)
    maps = features(2)
    logits, deltas = head(maps)
    assert [t.shape for t in logits] == [(1, 3, *m.shape[-2:]) for m in maps]
    assert [t.shape for t in deltas] == [(1, 12, *m.shape[-2:]) for m in maps]
    backward_reaches_parameters(head, logits + deltas)


def smoke_roi_pooler(entry, ctx):
    pooler = build(entry, ctx, featmap_names=["0", "1"])
    maps = {str(i): m.requires_grad_() for i, m in enumerate(features(2))}
    boxes = [ROIS[0].clone().requires_grad_()]
    out = pooler(maps, boxes, [(IMAGE, IMAGE)])
    assert out.shape == (K, C, *_resolution(pooler))
    out.sum().backward()
    assert any(m.grad is not None and m.grad.abs().sum() > 0 for m in maps.values())
    if entry.meta.get("box_gradient"):  # declared differentiable w.r.t. box coordinates
        assert boxes[0].grad is not None and boxes[0].grad.abs().sum() > 0


def smoke_box_head(entry, ctx):
    head = build(entry, ctx, in_channels=C, resolution=(7, 7))
    out = head(torch.rand(K, C, 7, 7))
    assert out.shape == (K, head.out_channels)
    backward_reaches_parameters(head, out)


def smoke_box_predictor(entry, ctx):
    pred = build(entry, ctx, in_channels=16, num_classes=NUM_CLASSES)
    scores, deltas = pred(torch.rand(K, 16))
    assert scores.shape == (K, NUM_CLASSES) and deltas.shape == (K, 4 * NUM_CLASSES)
    backward_reaches_parameters(pred, (scores, deltas))


def smoke_mask_head(entry, ctx):
    head = build(entry, ctx, in_channels=C)
    out = head(torch.rand(K, C, 14, 14))
    assert out.shape[:2] == (K, head.out_channels) and out.shape[-1] >= 14
    backward_reaches_parameters(head, out)


def smoke_mask_predictor(entry, ctx):
    pred = build(entry, ctx, in_channels=C, num_classes=NUM_CLASSES)
    out = pred(torch.rand(K, C, 14, 14))
    assert out.shape[:2] == (K, NUM_CLASSES) and out.shape[-1] >= 14
    backward_reaches_parameters(pred, out)


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy of each mask's pixels (x2 = last column + 1)."""
    out = []
    for m in masks.bool():
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def check_item(image: torch.Tensor, target: dict, num_categories: int) -> None:
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    n, (h, w) = len(target["labels"]), image.shape[-2:]
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and all(1 <= int(v) <= num_categories for v in target["labels"])
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, h, w)
    assert target["area"].shape == (n,) and target["iscrowd"].shape == (n,)
    assert isinstance(target["image_id"], int)
    b = target["boxes"]
    assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()


def smoke_dataset(entry, ctx):
    ds = build(entry, ctx)
    assert len(ds) >= 1
    cats = ds.categories
    assert cats and all(isinstance(c["id"], int) and isinstance(c["name"], str) for c in cats)
    assert len(ds.aspect_ratios()) == len(ds)
    objects = 0
    for i in range(min(len(ds), 3)):
        image, target = ds[i]
        check_item(image, target, len(cats))
        objects += len(target["labels"])
        if len(target["labels"]):  # boxes enclose their masks
            assert (tight_boxes(target["masks"]) - target["boxes"]).abs().max() <= 1.0
    assert objects > 0
    gt = ds.coco()
    assert sorted(gt.getCatIds()) == sorted(c["id"] for c in cats)
    assert ds[0][1]["image_id"] in gt.getImgIds()


def smoke_transform(entry, ctx):
    transform = build(entry, ctx)
    image, target = ctx["sample"]
    original = (image.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()})
    for seed in range(4):
        out_image, out = transform(image, target, generator=torch.Generator().manual_seed(seed))
        check_item(out_image, out, 5)
        assert torch.equal(out["labels"], target["labels"])
        scale = out_image.shape[-1] / image.shape[-1]
        assert (tight_boxes(out["masks"]) - out["boxes"]).abs().max() <= 1.0 + max(1.0, scale)
    assert torch.equal(image, original[0])  # inputs are not modified
    assert all(torch.equal(target[k], v) for k, v in original[1].items() if torch.is_tensor(v))


def smoke_optimizer(entry, ctx):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = build(entry, ctx, params=model.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.rand(3, 4)).square().sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def smoke_lr_scheduler(entry, ctx):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = build(entry, ctx, optimizer=opt, total_iters=10, iters_per_epoch=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(math.isfinite(v) and 0 <= v <= 0.1 + 1e-12 for v in lrs)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    sched2 = build(entry, ctx, optimizer=opt2, total_iters=10, iters_per_epoch=4)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == sched.last_epoch


RULES = {
    "backbone": smoke_backbone,
    "anchor_generator": smoke_anchor_generator,
    "rpn_head": smoke_rpn_head,
    "roi_pooler": smoke_roi_pooler,
    "box_head": smoke_box_head,
    "box_predictor": smoke_box_predictor,
    "mask_head": smoke_mask_head,
    "mask_predictor": smoke_mask_predictor,
    "dataset": smoke_dataset,
    "transform": smoke_transform,
    "optimizer": smoke_optimizer,
    "lr_scheduler": smoke_lr_scheduler,
}

COMPONENTS = [(family, name) for family, registry in FAMILIES.items() for name in registry.names()]


def test_every_family_has_a_smoke_rule():
    assert set(FAMILIES) - set(RULES) == set(), "add a smoke rule to RULES for each new family"
    assert {f for f, _ in COMPONENTS} == set(FAMILIES), "every family has at least one registered component"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from rcnn_lab.data.export import export_shapes
    from rcnn_lab.data.shapes import shapes

    folder = export_shapes(tmp_path_factory.mktemp("components") / "coco", num_images=4, image_size=64)
    sample = next(item for item in shapes(num_images=8, image_size=64, min_objects=2) if len(item[1]["labels"]) >= 2)
    return {"coco": folder, "sample": sample}


@pytest.mark.parametrize("family, name", COMPONENTS, ids=[f"{f}:{n}" for f, n in COMPONENTS])
def test_component_smoke(family, name, ctx):
    if family not in RULES:
        pytest.fail(f"no smoke rule for family '{family}'; add one to RULES in {__file__}")
    torch.manual_seed(0)
    RULES[family](FAMILIES[family].get(name), ctx)
