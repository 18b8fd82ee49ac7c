"""Data layer: datasets, transforms, batching and export.

* ``shapes``: deterministic synthetic instance segmentation (registered dataset ``shapes``).
* ``coco``: an images folder plus a COCO JSON file (registered dataset ``coco``).
* ``transforms``: registered training augmentations (``hflip``, ``resize_range``, ``color_jitter``)
  and ``Compose``.
* ``loader``: ``collate``, aspect-ratio grouping and ``build_loader`` (infinite, resumable,
  deterministic training streams; finite ordered evaluation loaders).
* ``export``: ``export_shapes`` writes a shapes split as PNG files plus COCO JSON.

Every dataset follows the Dataset contract in ``docs/architecture.md``.
"""
