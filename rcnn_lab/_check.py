"""Start-up check that torchvision's compiled ops load with the installed torch."""

from __future__ import annotations

from rcnn_lab.errors import RcnnLabError


class BrokenInstallError(RcnnLabError):
    exit_code = 3


def check_torchvision_ops() -> None:
    """Raise ``BrokenInstallError`` (one line: cause and fix) if ``torchvision.ops.nms`` cannot run."""
    import torch

    try:
        import torchvision  # a mismatched build already fails here, registering its ops

        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
        torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
    except (RuntimeError, AttributeError, ImportError, OSError) as exc:
        from importlib.metadata import PackageNotFoundError, version

        try:
            tv_version = version("torchvision")
        except PackageNotFoundError:
            tv_version = "(not installed)"
        raise BrokenInstallError(
            f"torchvision {tv_version} cannot run its C++ ops with torch {torch.__version__} "
            f"({str(exc).splitlines()[0][:90]}): the two builds do not match (e.g. a local '+cpu' torch wheel "
            "beside a registry torchvision). Fix: make a fresh venv and `pip install -e .` so pip resolves a "
            "matching torch/torchvision pair from the package index (or `make clean test`)."
        ) from None
