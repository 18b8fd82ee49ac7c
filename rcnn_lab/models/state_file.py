"""Reading a weights file: ``torch.load`` with ``weights_only``, memory-mapped where only names and shapes are needed."""

from __future__ import annotations

from pathlib import Path

import torch


def load(path: str | Path, mmap: bool = False):
    """The file's object on the CPU; ``mmap``: its tensors stay on disk until used (the load-time checks compare
    names and shapes only). A file saved in torch's older, non-zip format cannot be mapped and is read whole."""
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)
