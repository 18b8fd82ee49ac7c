"""The one home of ``train.device``: ``auto`` picks CUDA when available, else the CPU."""

from __future__ import annotations

import torch

from rcnn_lab.errors import ConfigError, Problem


def resolve_device(name: str) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a ``torch.device``; ``ConfigError`` (key ``train.device``) without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([Problem("train.device", f"{name} requested but CUDA is not available; use auto or cpu")])
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The accelerator's model name (``cpu`` for the CPU)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
