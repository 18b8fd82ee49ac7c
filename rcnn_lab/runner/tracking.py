"""MLflow tracking: store resolution, reachability, runs, batched logging, claims."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from rcnn_lab.errors import RcnnLabError

DEFAULT_ROOT = Path("runs")
TAG = "rcnn_lab."  # every rcnn-lab tag starts with this
STALE_AFTER_S = 600  # a RUNNING claim whose heartbeat is older than this may be taken over


class TrackingError(RcnnLabError):
    exit_code = 3


def resolve_uri(configured: str | None, root: Path = DEFAULT_ROOT) -> str:
    """``tracking.uri`` > ``MLFLOW_TRACKING_URI`` > sqlite at ``runs/mlflow.db``."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def default_artifact_root(uri: str, root: Path = DEFAULT_ROOT) -> str | None:
    """Artifacts of a local sqlite store live under ``runs/artifacts``; servers choose their own."""
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (root / "artifacts").resolve().as_uri()
    return None


def local_store_missing(uri: str) -> bool:
    """True for a sqlite/file store that does not exist yet (read-only commands must not create it)."""
    if uri.startswith("sqlite:///"):
        return not Path(uri[len("sqlite:///"):]).exists()
    if uri.startswith("file:") or "://" not in uri:
        from urllib.parse import urlparse

        return not Path(urlparse(uri).path if uri.startswith("file:") else uri).exists()
    return False


def client(uri: str):
    """An ``MlflowClient`` on ``uri`` after checking that the store answers (fail fast, one line)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    c = MlflowClient(tracking_uri=uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"tracking store {uri} is unreachable ({first}); start the server (mlflow server --host 127.0.0.1) "
            "or set tracking.uri / MLFLOW_TRACKING_URI to a reachable store"
        ) from None
    return c


def experiment_id(c, name: str, artifact_root: str | None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    loc = f"{artifact_root}/{name}" if artifact_root else None
    try:
        return c.create_experiment(name, artifact_location=loc)
    except Exception:  # created concurrently by another worker
        return c.get_experiment_by_name(name).experiment_id


def runs_with_hash(c, exp_id: str, config_hash: str) -> list:
    """Child runs of this config hash, newest first."""
    return c.search_runs(
        [exp_id], filter_string=f"tags.`{TAG}config_hash` = '{config_hash}'", order_by=["attributes.start_time DESC"],
    )


def git_state(cwd: Path | None = None) -> dict[str, str]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {f"{TAG}git_commit": head.stdout.strip(), f"{TAG}git_dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def versions() -> dict[str, str]:
    import torch
    import torchvision

    from rcnn_lab import __version__

    return {f"{TAG}version": __version__, f"{TAG}torch": torch.__version__, f"{TAG}torchvision": torchvision.__version__}


def claim_tags() -> dict[str, str]:
    return {f"{TAG}host": socket.gethostname(), f"{TAG}pid": str(os.getpid()), f"{TAG}heartbeat": str(int(time.time()))}


def claim_is_stale(run) -> bool:
    """A RUNNING run whose worker is gone: same host and dead pid, or a heartbeat older than STALE_AFTER_S."""
    tags = run.data.tags
    host, pid, beat = tags.get(f"{TAG}host"), tags.get(f"{TAG}pid"), tags.get(f"{TAG}heartbeat")
    if host == socket.gethostname() and pid and pid.isdigit():
        if int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return beat is None or time.time() - int(beat) > STALE_AFTER_S
    return beat is None or time.time() - int(beat) > STALE_AFTER_S


def flatten_params(flat: dict) -> list:
    """Resolved config (dotted keys) as MLflow params (values as text, lists in JSON)."""
    import json

    from mlflow.entities import Param

    out = []
    for k, v in flat.items():
        text = v if isinstance(v, str) else json.dumps(v)
        out.append(Param(k, text[:6000]))
    return out
