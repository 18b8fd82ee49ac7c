"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from rcnn_lab.errors import ConfigError, Problem, display_path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_py_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state():
    version, inner, gauss = random.getstate()
    return [version, list(inner), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves neither a partial file nor the temp file
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path, key: str = "") -> dict:
    """Load a checkpoint (tensors and plain containers only); one-line errors naming the file.

    ``key`` is the setting that pointed at the file, if any (e.g. a CLI flag).
    """
    path = Path(path)
    file = display_path(path)
    if not path.is_file():
        raise ConfigError([Problem(key, "checkpoint not found", file)])
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [""]
        raise ConfigError([Problem(key, f"not a readable checkpoint ({type(exc).__name__}: {lines[0][:100]}); "
                                   "delete it to start over", file)]) from None
    missing = [k for k in ("model", "optimizer", "iteration") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ConfigError([Problem(key, f"not an rcnn-lab checkpoint (missing {', '.join(missing)}); "
                                   "delete it or point at another file", file)])
    return payload


def latest(folder: Path) -> Path | None:
    """Newest ``iter_*.pt`` in ``folder`` (by iteration number)."""
    folder = Path(folder)
    cands = sorted(folder.glob("iter_*.pt"), key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit() else -1)
    return cands[-1] if cands else None
