"""Mask R-CNN components and the model builder."""
