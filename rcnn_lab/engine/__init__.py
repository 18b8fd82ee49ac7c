"""Training engine: the loop (``trainer``), hooks, checkpoints, optimizers and COCO evaluation (``evaluate``)."""
