"""RoI poolers: multi-level RoIAlign over FPN feature maps.

Both poolers keep torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` level assignment
(``LevelMapper``, FPN paper eq. 1, scales inferred from the image sizes on the first call) and
differ only in the RoIAlign op: torchvision's C++ kernel (no gradient for the boxes) or
:func:`rcnn_lab.ops.roi_align` (gradients for the features and the boxes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import LevelMapper, _convert_to_roi_format, _filter_input, _setup_scales

from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.ops.roi_align import roi_align as diff_roi_align
from rcnn_lab.registry import ROI_POOLERS

__all__ = ["AlignedMultiScaleRoIAlign", "DifferentiableMultiScaleRoIAlign", "multiscale_roi_align", "differentiable_roi_align"]


def _multiscale_roi_align(
    op: Callable[..., Tensor],
    x_filtered: list[Tensor],
    boxes: list[Tensor],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    scales: list[float],
    mapper: LevelMapper,
) -> Tensor:
    """torchvision's ``_multiscale_roi_align`` with the RoIAlign ``op`` and ``aligned`` as arguments."""
    rois = _convert_to_roi_format(boxes)
    if len(x_filtered) == 1:
        return op(x_filtered[0], rois, output_size, scales[0], sampling_ratio, aligned)

    levels = mapper(boxes)
    first = x_filtered[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], *output_size))
    for level, (feature, scale) in enumerate(zip(x_filtered, scales)):
        idx_in_level = torch.where(levels == level)[0]
        pooled = op(feature, rois[idx_in_level], output_size, scale, sampling_ratio, aligned)
        result[idx_in_level] = pooled.to(result.dtype)
    return result


def _output_size(output_size: int | list[int]) -> tuple[int, int]:
    """``7`` or ``[7, 7]`` -> ``(7, 7)``; a ``ConfigError`` on ``output_size`` otherwise."""
    size = [output_size] * 2 if isinstance(output_size, int) else list(output_size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ConfigError([Problem("output_size", f"expected a positive int or [height, width], got {output_size!r}")])
    return size[0], size[1]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """:class:`~torchvision.ops.MultiScaleRoIAlign` with RoIAlign's ``aligned`` option.

    torchvision's class always pools with ``aligned=False``; with ``aligned=True`` each box is
    shifted by -0.5 pixel (Detectron2's alignment). Level assignment is torchvision's.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int] | list[int],
        sampling_ratio: int,
        *,
        aligned: bool = False,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__(featmap_names, output_size, sampling_ratio,
                         canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.aligned = aligned

    def _op(self) -> Callable[..., Tensor]:
        return tv_roi_align

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool ``boxes`` (per image, (x1, y1, x2, y2) in image pixels) from the feature maps ``x``.

        Args:
            x (OrderedDict[str, Tensor]): feature maps; those named in ``featmap_names`` are pooled.
            boxes (List[Tensor[L, 4]]): boxes of each image, in input-image coordinates.
            image_shapes (List[Tuple[int, int]]): (height, width) of each image before the backbone,
                used to infer each feature map's scale on the first call.

        Returns:
            Tensor[K, C, output_size[0], output_size[1]]: pooled features, RoIs in the order of ``boxes``.
        """
        x_filtered = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(x_filtered, image_shapes, self.canonical_scale, self.canonical_level)
        return _multiscale_roi_align(self._op(), x_filtered, boxes, self.output_size, self.sampling_ratio,
                                     self.aligned, self.scales, self.map_levels)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )


class DifferentiableMultiScaleRoIAlign(AlignedMultiScaleRoIAlign):
    """Multi-scale RoIAlign whose output is differentiable with respect to the box coordinates.

    Same levels, sample points and output as :class:`~torchvision.ops.MultiScaleRoIAlign`, pooled
    with :func:`rcnn_lab.ops.roi_align` instead of torchvision's C++ kernel.
    """

    def _op(self) -> Callable[..., Tensor]:
        return diff_roi_align


@ROI_POOLERS.register("multiscale_roi_align", box_gradient=False)
def multiscale_roi_align(
    featmap_names: list[str],
    output_size: int | list[int] = 7,
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> MultiScaleRoIAlign:
    """torchvision MultiScaleRoIAlign (C++ kernel; no gradient for box coordinates).

    ``aligned=False`` gives torchvision's own module; ``aligned=True`` a subclass passing it on.
    Mask R-CNN's defaults are ``output_size`` 7 (box head) / 14 (mask head), ``sampling_ratio`` 2.
    """
    if not aligned:
        return MultiScaleRoIAlign(featmap_names, _output_size(output_size), sampling_ratio,
                                  canonical_scale=canonical_scale, canonical_level=canonical_level)
    return AlignedMultiScaleRoIAlign(featmap_names, _output_size(output_size), sampling_ratio, aligned=True,
                                     canonical_scale=canonical_scale, canonical_level=canonical_level)


@ROI_POOLERS.register("differentiable_roi_align", box_gradient=True)
def differentiable_roi_align(
    featmap_names: list[str],
    output_size: int | list[int] = 7,
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> DifferentiableMultiScaleRoIAlign:
    """MultiScaleRoIAlign on a grid_sample RoIAlign: gradients for features and box coordinates.

    Output equals torchvision's MultiScaleRoIAlign; ``sampling_ratio <= 0`` (adaptive) pools RoIs
    in groups of equal sampling grid.
    """
    return DifferentiableMultiScaleRoIAlign(featmap_names, _output_size(output_size), sampling_ratio, aligned=aligned,
                                            canonical_scale=canonical_scale, canonical_level=canonical_level)
