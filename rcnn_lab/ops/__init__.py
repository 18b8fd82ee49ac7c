"""Differentiable operators (gradients for inputs torchvision's C++ kernels leave out).

* :func:`rcnn_lab.ops.roi_align.roi_align`: RoIAlign with gradients for features and boxes.
"""
