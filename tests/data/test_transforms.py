"""Transforms: geometry stays consistent, randomness is reproducible given a generator."""

from __future__ import annotations

import pytest
import torch

from rcnn_lab.config.types import Spec
from rcnn_lab.data.shapes import ShapesDataset
from rcnn_lab.data.transforms import Compose, color_jitter, hflip, resize_range
from rcnn_lab.errors import ConfigError
from rcnn_lab.registry import TRANSFORMS


@pytest.fixture(scope="module")
def items():
    ds = ShapesDataset(num_images=4, image_size=48, min_size=8, max_size=24, max_objects=4)
    return [ds[i] for i in range(len(ds))]


def tight_boxes(masks: torch.Tensor) -> list[list[float]]:
    out = []
    for m in masks.bool():
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return out


def test_hflip_keeps_boxes_equal_to_mask_boxes(items):
    flip = TRANSFORMS.build(Spec("hflip", {"p": 1.0}), "data.transforms[0]")
    for image, target in items:
        out_image, out = flip(image, target)
        assert torch.equal(out_image, image.flip(-1))
        assert out["boxes"].tolist() == tight_boxes(out["masks"])
        assert torch.equal(out["labels"], target["labels"]) and out["image_id"] == target["image_id"]
        again_image, again = flip(out_image, out)
        assert torch.equal(again_image, image) and torch.equal(again["boxes"], target["boxes"])
    image, target = items[0]
    same_image, same = hflip(0.0)(image, target)
    assert same_image is image and same is target


def test_transforms_do_not_modify_their_inputs(items):
    image, target = items[0]
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}
    image_copy = image.clone()
    Compose([hflip(1.0), resize_range(30, 60), color_jitter(0.5, 0.5, 0.5)])(image, target, torch.Generator().manual_seed(0))
    assert torch.equal(image, image_copy)
    assert all(torch.equal(v, before[k]) if torch.is_tensor(v) else v == before[k] for k, v in target.items())


def test_same_generator_seed_gives_the_same_augmentation(items):
    pipeline = Compose([hflip(0.5), resize_range(32, 80), color_jitter()])
    image, target = items[1]
    runs = [pipeline(image, target, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    (ia, ta), (ib, tb), _ = runs
    assert torch.equal(ia, ib) and all(torch.equal(ta[k], tb[k]) for k in ("boxes", "masks", "area"))
    shapes = {pipeline(image, target, torch.Generator().manual_seed(s))[0].shape for s in range(12)}
    assert len(shapes) > 1  # the seed matters
    flipped = {torch.equal(pipeline.transforms[0](image, target, torch.Generator().manual_seed(s))[0], image)
               for s in range(12)}
    assert flipped == {True, False}


def test_resize_range_scales_image_boxes_and_masks(items):
    image, target = items[2]
    resize = resize_range(60, 100)
    for seed in range(5):
        out_image, out = resize(image, target, torch.Generator().manual_seed(seed))
        h, w = out_image.shape[-2:]
        assert 60 <= min(h, w) <= 100 and out["masks"].shape[-2:] == (h, w)
        assert out["masks"].dtype == torch.uint8
        scale = h / image.shape[-2]
        assert torch.allclose(out["boxes"], target["boxes"] * scale)
        assert torch.allclose(out["area"], target["area"] * scale * scale)
        for box, mask_box in zip(out["boxes"].tolist(), tight_boxes(out["masks"])):
            assert max(abs(a - b) for a, b in zip(box, mask_box)) <= 1.5  # nearest-neighbour masks
    capped, _ = resize_range(96, 96, max_long_side=64)(torch.zeros(3, 20, 40), {}, None)
    assert capped.shape[-2:] == (32, 64)


def test_plugin_transform_without_generator_is_seeded_and_isolated(items):
    def noisy(image, target):  # a plugin written against torch's global RNG
        return image + torch.rand(()), target

    image, target = items[0]
    pipeline = Compose([noisy])
    state = torch.get_rng_state()
    a, _ = pipeline(image, target, torch.Generator().manual_seed(3))
    b, _ = pipeline(image, target, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched


def test_invalid_arguments_name_the_key():
    with pytest.raises(ConfigError) as exc:
        TRANSFORMS.build(Spec("resize_range", {"min_size": 100, "max_size": 50}), "data.transforms[1]")
    assert exc.value.problems[0].path == "data.transforms[1].max_size"
    with pytest.raises(ConfigError, match=r"data.transforms\[0\].p: must be a probability"):
        TRANSFORMS.build(Spec("hflip", {"p": 1.5}), "data.transforms[0]")
