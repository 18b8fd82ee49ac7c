"""RoIAlign with gradients for both the features and the box coordinates.

``torchvision.ops.roi_align`` (C++/CUDA) returns no gradient for ``boxes``. This version samples
the features with :func:`torch.nn.functional.grid_sample`, which is differentiable with respect to
the sampling grid, so the pooled features are differentiable with respect to the RoI corners too.

The sample points, the bilinear weights and the border rules are those of torchvision's kernel:

* bin ``(ph, pw)`` of a RoI is averaged over ``grid_h x grid_w`` points placed at
  ``roi_start + ph * bin_size + (iy + 0.5) * bin_size / grid_h`` (``-0.5`` pixel shift of the
  RoI when ``aligned=True``; non-aligned RoIs are at least 1 pixel wide and high);
* a point with ``y < -1`` or ``y > H`` (or the same for ``x``) contributes 0;
* otherwise ``y`` is clamped to ``[0, H - 1]`` (and ``x`` to ``[0, W - 1]``) before interpolating.

All RoIs of one call are sampled by a single ``grid_sample``: each image's grid has one row per
bin of its RoIs (RoI by RoI, images with fewer RoIs padded with points that sample zeros) and one
column per sampling point of the bin; a sum over the columns gives the bins' averages. Keeping a
RoI's points together keeps the gathers (and the gradient scatter) cache-local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torchvision.ops._utils import check_roi_boxes_shape, convert_boxes_to_roi_format

__all__ = ["roi_align"]

# Pixel coordinate given to points that must sample zero: both bilinear taps (-4, -3) fall
# outside the feature map, so ``grid_sample(padding_mode="zeros")`` returns 0 there.
_OUTSIDE = -4.0


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Region of Interest (RoI) Align, differentiable with respect to ``input`` and ``boxes``.

    Same arguments and result as :func:`torchvision.ops.roi_align`. Half-precision ``input`` is
    pooled in float32 (as torchvision does under autocast) and the result cast back.

    Args:
        input (Tensor[N, C, H, W]): the feature maps of a batch of ``N`` images.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): box coordinates in (x1, y1, x2, y2) format.
            A single Tensor has the batch index of each box in its first column; a list has one
            Tensor per image of the batch.
        output_size (int or Tuple[int, int]): the size of the output (in bins) as (height, width).
        spatial_scale (float): factor mapping box coordinates to ``input`` coordinates
            (e.g. 0.25 for a feature map of stride 4). Default: 1.0
        sampling_ratio (int): sampling points per bin and dimension. If <= 0, an adaptive number
            ``ceil(roi_height / output_height)`` (and likewise for the width) is used per RoI,
            in which case RoIs are pooled in groups of equal grid size. Default: -1
        aligned (bool): if True, shift the box coordinates by -0.5 pixel (Detectron2's
            alignment); if False, the legacy behaviour. Default: False

    Returns:
        Tensor[K, C, output_size[0], output_size[1]]: the pooled RoIs.
    """
    check_roi_boxes_shape(boxes)
    rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(list(boxes))
    if input.dtype in (torch.float16, torch.bfloat16):
        # as torchvision under autocast: half-precision coordinates would be off by up to a pixel
        out = roi_align(input.float(), rois.float(), output_size, spatial_scale, sampling_ratio, aligned)
        return out.to(input.dtype)
    pooled_h, pooled_w = _pair(output_size)
    rois = rois.to(input.dtype)
    if rois.shape[0] == 0:
        # empty, but connected to the inputs so that backward gives zero gradients
        return input[:0, :, :1, :1].expand(0, input.shape[1], pooled_h, pooled_w) + rois[:0, :1, None, None] * 0

    batch_idx = rois[:, 0].detach().to(torch.int64)
    offset = 0.5 if aligned else 0.0
    # same arithmetic (and order of operations) as torchvision's kernel
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = (rois[:, 3] * spatial_scale - offset) - start_w
    roi_h = (rois[:, 4] * spatial_scale - offset) - start_h
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / pooled_w
    bin_h = roi_h / pooled_h

    if sampling_ratio > 0:
        return _roi_align_grid(input, batch_idx, start_h, start_w, bin_h, bin_w, pooled_h, pooled_w,
                               sampling_ratio, sampling_ratio)

    # adaptive sampling: the grid size depends on each RoI's size; pool RoIs of equal grid size together
    grid_h = torch.ceil(roi_h.detach() / pooled_h).to(torch.int64).clamp(min=0)
    grid_w = torch.ceil(roi_w.detach() / pooled_w).to(torch.int64).clamp(min=0)
    key = grid_h * (int(grid_w.max()) + 1) + grid_w
    pieces, members = [], []
    for k in torch.unique(key).tolist():
        idx = torch.nonzero(key == k).squeeze(1)
        gh, gw = int(grid_h[idx[0]]), int(grid_w[idx[0]])
        members.append(idx)
        if gh == 0 or gw == 0:  # empty RoI (aligned, size <= 0): no samples, 0 as in torchvision
            pieces.append(_connected_zeros(input, rois, (idx.shape[0], input.shape[1], pooled_h, pooled_w)))
        else:
            pieces.append(_roi_align_grid(input, batch_idx[idx], start_h[idx], start_w[idx], bin_h[idx], bin_w[idx],
                                          pooled_h, pooled_w, gh, gw))
    order = torch.cat(members)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.shape[0], device=order.device)
    return torch.cat(pieces).index_select(0, position)


def _connected_zeros(input: Tensor, rois: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zeros of ``shape`` that stay in the graph of ``input`` and ``rois`` (zero gradient for both).

    As torchvision's kernel: its output for RoIs without sampling points is 0 but still has a
    ``grad_fn``, so ``backward()`` works. Sums of empty slices are exactly 0 even if the inputs hold
    inf or NaN.
    """
    return input.new_zeros(shape) + (input.flatten()[:0].sum() + rois.flatten()[:0].sum())


def _sample_coords(start: Tensor, bin_size: Tensor, pooled: int, grid: int, size: int) -> Tensor:
    """Normalised ``grid_sample`` coordinates ``[K, pooled, grid]`` of one axis, border rules applied."""
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    i = torch.arange(grid, device=start.device, dtype=start.dtype) + 0.5
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
             + i[None, None, :] * bin_size[:, None, None] / grid)
    inside = (coord >= -1.0) & (coord <= size)
    coord = torch.where(inside, coord.clamp(0.0, size - 1.0), _OUTSIDE)
    # pixel -> normalised coordinate for align_corners=False: pixel centres at (2 * i + 1) / size - 1
    return (2.0 * coord + 1.0) / size - 1.0


def _roi_align_grid(
    input: Tensor,
    batch_idx: Tensor,
    start_h: Tensor,
    start_w: Tensor,
    bin_h: Tensor,
    bin_w: Tensor,
    pooled_h: int,
    pooled_w: int,
    grid_h: int,
    grid_w: int,
) -> Tensor:
    """RoIAlign of ``K`` RoIs with a fixed ``grid_h x grid_w`` sampling grid per bin."""
    num_images, channels, height, width = input.shape
    num_rois = batch_idx.shape[0]
    gy = _sample_coords(start_h, bin_h, pooled_h, grid_h, height)  # [K, PH, GH]
    gx = _sample_coords(start_w, bin_w, pooled_w, grid_w, width)  # [K, PW, GW]
    # sampling points of a RoI bin by bin, a bin's points next to each other: [K, PH, PW, GH, GW, 2]
    shape = (num_rois, pooled_h, pooled_w, grid_h, grid_w)
    grid = torch.stack((gx[:, None, :, None, :].expand(shape), gy[:, :, None, :, None].expand(shape)), dim=-1)

    # slot of each RoI among the RoIs of its image; images with fewer RoIs are padded
    if num_images == 1:
        slot, per_image = torch.arange(num_rois, device=batch_idx.device), num_rois
    else:
        counts = torch.bincount(batch_idx, minlength=num_images)
        per_image = int(counts.max())
        order = torch.argsort(batch_idx, stable=True)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(batch_idx)
        slot[order] = torch.arange(num_rois, device=batch_idx.device) - first[batch_idx[order]]
        padded = grid.new_full((num_images, per_image, *shape[1:], 2), 2.0 * _OUTSIDE)
        grid = padded.index_put((batch_idx, slot), grid)
    # one grid row per bin, one column per sampling point: [N, per_image * PH * PW, GH * GW, 2]
    samples = grid_h * grid_w
    grid = grid.reshape(num_images, per_image * pooled_h * pooled_w, samples, 2)

    out = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.sum(-1) * (1.0 / samples) if samples > 1 else out.squeeze(-1)  # [N, C, per_image * PH * PW]
    out = out.view(num_images, channels, per_image, pooled_h * pooled_w).transpose(1, 2)
    out = out.reshape(num_images * per_image, channels, pooled_h, pooled_w)
    return out if num_images == 1 else out.index_select(0, batch_idx * per_image + slot)
