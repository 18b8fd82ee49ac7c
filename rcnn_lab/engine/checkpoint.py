"""Checkpoints: named here, written atomically, read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from rcnn_lab.errors import ConfigError, Problem, cut, display_path
from rcnn_lab.models import state_file

FOLDER = "checkpoints"  # under a run's output folder
PREFIX, SUFFIX = "iter_", ".pt"  # iter_0000200.pt: the state after 200 iterations


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


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that were killed midway (``kill -9`` skips the
    cleanup in :func:`save`). Call only from the process that owns ``folder``'s run."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        if tmp.name.rsplit("-", 1)[-1] != str(os.getpid()):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def load(path: Path, key: str = "") -> dict:
    """Load a checkpoint (tensors and plain containers only); one-line errors naming the file.

    ``key`` is the setting that pointed at the file, if any (e.g. a CLI flag).
    """
    path = Path(path)
    file = display_path(path)
    if not path.is_file():
        raise ConfigError([Problem(key, "checkpoint not found", file)])
    try:
        payload = state_file.load(path)
    except Exception as exc:
        raise ConfigError([Problem(key, f"not a readable checkpoint ({load_failure(exc)}); "
                                   "delete it to start over", file)]) from None
    missing = [k for k in ("model", "optimizer", "iteration") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ConfigError([Problem(key, f"not an rcnn-lab checkpoint (missing {', '.join(missing)}); "
                                   "delete it or point at another file", file)])
    return payload


def check(path: Path, total_iterations: int | None = None) -> None:
    """Refuse a checkpoint that cannot be resumed, with one line naming it: empty, truncated, foreign, or
    claiming an iteration beyond the run's ``total_iterations`` (it would end the run without training).
    Tensors are memory-mapped, not read."""
    path = Path(path)
    file = display_path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigError([Problem("", "checkpoint is empty (0 bytes: a write that never finished)", file)])
    try:
        payload = state_file.load(path, mmap=True)
    except Exception:  # load() gives torch's reason
        payload = load(path)
    if not isinstance(payload, dict) or any(k not in payload for k in ("model", "optimizer", "iteration")):
        load(path)  # raises "not an rcnn-lab checkpoint"
    check_iteration(payload, total_iterations, file)
    iteration, named = payload["iteration"], iteration_of(path)
    if named is not None and named != iteration:
        raise ConfigError([Problem("", f"checkpoint holds iteration {iteration:,} but its name says {named:,}", file)])


def check_iteration(payload: dict, total_iterations: int | None, file: str) -> None:
    """A checkpoint's ``iteration`` is a count within the run (``total_iterations``; None: unknown yet)."""
    iteration = payload.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ConfigError([Problem("", f"checkpoint holds iteration {cut(repr(iteration))}, not a count of "
                                   "iterations", file)])
    if total_iterations is not None and iteration > total_iterations:
        raise ConfigError([Problem("", f"checkpoint claims iteration {iteration:,} but the run has "
                                   f"{total_iterations:,}; it belongs to another run", file)])


def folder(out_dir: Path) -> Path:
    """Where a run's checkpoints live, under its output folder."""
    return Path(out_dir) / FOLDER


def path_for(folder: Path, iteration: int) -> Path:
    """The checkpoint after ``iteration`` finished iterations: ``iter_0000200.pt``."""
    return Path(folder) / f"{PREFIX}{iteration:07d}{SUFFIX}"


def iteration_of(path: Path) -> int | None:
    """The iteration a checkpoint file name stands for (None for other names)."""
    name = Path(path).name
    digits = name[len(PREFIX):-len(SUFFIX)] if name.startswith(PREFIX) and name.endswith(SUFFIX) else ""
    return int(digits) if digits.isdigit() else None


def saved(folder: Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest iteration first."""
    found = [(iteration_of(p), p) for p in Path(folder).glob(f"{PREFIX}*{SUFFIX}")]
    return [p for it, p in sorted((it, p) for it, p in found if it is not None)]


def load_failure(exc: Exception) -> str:
    """The informative sentence of a ``torch.load`` error (torch wraps it in paragraphs of advice)."""
    text = str(exc)
    if "Weights only load failed" in text:
        if "WeightsUnpickler error:" in text:
            candidates = text.split("WeightsUnpickler error:", 1)[1].splitlines()
        else:
            advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(")
            candidates = [ln for ln in text.splitlines() if not ln.strip().startswith(advice)]
        reason = next((ln.strip() for ln in candidates if ln.strip()), "unsupported content")
        return f"refused by torch.load(weights_only=True): {cut(reason.split('. ')[0], 200)}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {cut(first.split('. ')[0], 200)}"


def latest(folder: Path) -> Path | None:
    """Newest checkpoint in ``folder`` (by iteration number)."""
    found = saved(folder)
    return found[-1] if found else None
