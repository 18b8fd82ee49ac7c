"""rcnn_lab.ops.roi_align: torchvision's output, plus gradients for the box coordinates."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.autograd import gradcheck

from rcnn_lab.ops.roi_align import roi_align


def random_rois(num: int, num_images: int, width: float, height: float, seed: int = 0) -> torch.Tensor:
    """[K, 5] RoIs (batch index, x1, y1, x2, y2); some cross the image border, some are tiny."""
    g = torch.Generator().manual_seed(seed)
    size = torch.rand(num, 2, generator=g) * torch.tensor([width, height]) * 0.6 + 0.2
    start = torch.rand(num, 2, generator=g) * torch.tensor([width, height]) * 1.2 - 0.1 * torch.tensor([width, height])
    idx = torch.randint(0, num_images, (num, 1), generator=g).float()
    return torch.cat([idx, start, start + size], dim=1)


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(3, 4, 24, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
def test_forward_matches_torchvision(features, aligned, sampling_ratio, spatial_scale):
    rois = random_rois(60, 3, 32 / spatial_scale, 24 / spatial_scale)
    expected = torchvision.ops.roi_align(features, rois, (7, 5), spatial_scale, sampling_ratio, aligned)
    out = roi_align(features, rois, (7, 5), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, -1])
def test_adaptive_sampling_matches_torchvision(features, aligned, sampling_ratio):
    degenerate = torch.tensor([[0, 5.0, 5.0, 5.0, 9.0], [1, 6.0, 8.0, 4.0, 7.5], [2, 3.2, 1.1, 3.4, 1.3]])
    rois = torch.cat([random_rois(40, 3, 32, 24, seed=2), degenerate])
    expected = torchvision.ops.roi_align(features, rois, 3, 1.0, sampling_ratio, aligned)
    out = roi_align(features, rois, 3, 1.0, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_border_rules_match_torchvision():
    """Samples beyond [-1, H] are 0; within one pixel of the border they are clamped."""
    x = torch.arange(1.0, 1 + 2 * 6 * 5).view(1, 2, 6, 5)
    rois = torch.tensor([
        [0, -3.0, -3.0, 7.0, 8.0],   # covers the whole map and beyond
        [0, -1.8, -0.9, 0.4, 0.7],   # samples in (-1, 0): clamped to 0
        [0, 4.2, 5.1, 6.9, 7.2],     # samples in (H - 1, H] and beyond H
        [0, -9.0, -9.0, -4.0, -4.0],  # entirely outside: 0
    ])
    for aligned in (False, True):
        expected = torchvision.ops.roi_align(x, rois, 4, 1.0, 2, aligned)
        torch.testing.assert_close(roi_align(x, rois, 4, 1.0, 2, aligned), expected, atol=1e-5, rtol=0)
    assert roi_align(x, rois, 4, 1.0, 2)[3].abs().max() == 0


def test_list_of_boxes_and_unsorted_batch_index(features):
    rois = random_rois(30, 3, 32, 24, seed=3)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(3)]
    expected = torchvision.ops.roi_align(features, per_image, 2, 1.0, 2)
    torch.testing.assert_close(roi_align(features, per_image, 2, 1.0, 2), expected, atol=1e-5, rtol=0)
    # a single image, and RoIs in any batch order
    torch.testing.assert_close(roi_align(features[:1], [per_image[0]], 2, 1.0, 2),
                               torchvision.ops.roi_align(features[:1], [per_image[0]], 2, 1.0, 2), atol=1e-5, rtol=0)
    perm = torch.randperm(len(rois), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(roi_align(features, rois[perm], 2, 1.0, 2),
                               torchvision.ops.roi_align(features, rois[perm], 2, 1.0, 2), atol=1e-5, rtol=0)


def test_half_precision_pools_in_float32(features):
    rois = random_rois(20, 3, 32, 24, seed=6)
    out = roi_align(features.bfloat16(), rois, 3, 1.0, 2)
    assert out.dtype == torch.bfloat16
    expected = torchvision.ops.roi_align(features.bfloat16().float(), rois, 3, 1.0, 2)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


def test_no_rois_gives_empty_output(features):
    x = features.clone().requires_grad_(True)
    boxes = torch.zeros(0, 4, requires_grad=True)
    out = roi_align(x, [boxes], 7, 1.0, 2)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() == 0


# Small float64 inputs; box corners away from pixel and bin boundaries, where RoIAlign is smooth.
GC_ROIS = torch.tensor([
    [0, 1.3, 2.2, 7.7, 6.1],
    [1, -1.6, 0.4, 5.3, 9.7],
    [1, 3.1, 3.3, 10.6, 8.45],
    [0, 8.2, 5.1, 12.3, 10.6],
], dtype=torch.float64)


@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(False, 1), (False, 2), (True, 2), (True, 0)])
def test_gradcheck_features_and_boxes(aligned, sampling_ratio):
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    coords = GC_ROIS[:, 1:].clone().requires_grad_(True)

    def fn(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return roi_align(x, torch.cat([GC_ROIS[:, :1], coords], dim=1), (3, 2), 0.9, sampling_ratio, aligned)

    assert gradcheck(fn, (x, coords), fast_mode=True)


def test_feature_gradient_matches_torchvision_and_boxes_get_one(features):
    rois = random_rois(40, 3, 32, 24, seed=4)
    grad_out = torch.randn(40, 4, 7, 7, generator=torch.Generator().manual_seed(5))
    x_ref = features.clone().requires_grad_(True)
    torchvision.ops.roi_align(x_ref, rois, 7, 1.0, 2).backward(grad_out)
    x = features.clone().requires_grad_(True)
    boxes = rois.clone().requires_grad_(True)
    roi_align(x, boxes, 7, 1.0, 2).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    assert boxes.grad[:, 0].abs().sum() == 0  # batch index
    centre = (rois[:, 1:3] + rois[:, 3:]) / 2
    inside = (centre > 0).all(1) & (centre[:, 0] < 31) & (centre[:, 1] < 23)
    assert inside.sum() > 20
    assert (boxes.grad[inside, 1:].abs().sum(1) > 0).all()


@pytest.mark.parametrize("aligned", [True, False])
def test_degenerate_rois_give_zeros_that_stay_in_the_graph(aligned):
    # aligned + adaptive sampling: a RoI of zero width has no sampling points; torchvision returns
    # zeros with a grad_fn, so backward() works and gives zero gradients
    x = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    boxes = torch.tensor([[0, 5.0, 5.0, 5.0, 9.0], [0, 7.0, 3.0, 2.0, 3.0]], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = torchvision.ops.roi_align(x_ref, boxes.detach(), 7, 1.0, 0, aligned)
    out = roi_align(x, boxes, 7, 1.0, 0, aligned)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out.grad_fn is not None and expected.grad_fn is not None
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    if aligned:
        assert (out == 0).all() and (x.grad == 0).all() and (boxes.grad == 0).all()


@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(False, 2), (True, 2), (True, 0)])
def test_large_map_float32_error_grows_with_the_map_size(aligned, sampling_ratio):
    # float32 sample coordinates carry a rounding error proportional to their magnitude, so the
    # float32 error (of this op and of torchvision's own kernel) against float64 grows with the map
    # size: bounded by max(H, W) * 2**-23 * max|x| (the tolerance docs/proposal_gradient.md states)
    h, w = 200, 272
    x = torch.randn(2, 8, h, w, generator=torch.Generator().manual_seed(1))
    rois = random_rois(200, 2, w, h, seed=2)
    reference = torchvision.ops.roi_align(x.double(), rois.double(), 7, 1.0, sampling_ratio, aligned)
    torch.testing.assert_close(roi_align(x.double(), rois.double(), 7, 1.0, sampling_ratio, aligned), reference,
                               atol=1e-12, rtol=0)
    bound = max(h, w) * 2.0**-23 * float(x.abs().max())
    error = (roi_align(x, rois, 7, 1.0, sampling_ratio, aligned).double() - reference).abs().max()
    tv_error = (torchvision.ops.roi_align(x, rois, 7, 1.0, sampling_ratio, aligned).double() - reference).abs().max()
    assert error <= bound and tv_error <= bound
    assert error > 1e-5  # larger than the 1e-5 the small-map tests allow: the size dependence is real
