"""MLflow tracking: store resolution, reachability, runs, batched logging, claims."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from rcnn_lab.errors import RcnnLabError
from rcnn_lab.runner import tags
from rcnn_lab.runner.store_uri import check_uri, not_mlflow

DEFAULT_ROOT = Path("runs")
ROOT_ENV = "RCNN_LAB_RUNS"  # folder for the default store, artifacts and outputs (default: ./runs)
STALE_AFTER_S = 600  # a RUNNING claim whose heartbeat is older than this may be taken over


class TrackingError(RcnnLabError):
    exit_code = 3


def resolve_uri(configured: str | None, root: Path | None = None) -> str:
    """``tracking.uri`` > ``MLFLOW_TRACKING_URI`` > sqlite at ``<root>/mlflow.db`` (root: $RCNN_LAB_RUNS or runs/)."""
    if configured:
        return check_uri(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return check_uri(os.environ["MLFLOW_TRACKING_URI"])
    return f"sqlite:///{((root or runs_root()) / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` store, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def runs_root(uri: str | None = None) -> Path:
    """Where outputs (checkpoints) and local artifacts go: ``$RCNN_LAB_RUNS``, else the folder of a
    local sqlite store (so a store and its files stay together), else ``runs/``."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    db = sqlite_path(uri) if uri else None
    if db is not None and db.name != ":memory:":
        return db.parent
    return DEFAULT_ROOT


def default_artifact_root(uri: str, root: Path | None = None) -> str | None:
    """Artifacts of a local store live under ``<root>/artifacts``; servers choose their own."""
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return ((root or runs_root(uri)) / "artifacts").resolve().as_uri()
    return None


def local_store_missing(uri: str) -> bool:
    """True for a sqlite/file store that does not exist yet (read-only commands must not create it)."""
    if sqlite_path(uri) is not None:
        return not sqlite_path(uri).exists()
    if uri.startswith("file:") or "://" not in uri:
        from urllib.parse import urlparse

        return not Path(urlparse(uri).path if uri.startswith("file:") else uri).exists()
    return False


def quiet_mlflow() -> None:
    """Hide MLflow's INFO chatter ("Creating initial MLflow database tables...", the "View run at"
    lines a server store prints at every run end) but keep its warnings and errors."""
    import logging

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads of report inputs
    import mlflow  # noqa: F401  (configures its loggers on import; set the level after that)

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # urllib3's "Retrying (Retry(total=6 ...))" warnings repeat for minutes of an outage on stderr; the journal says it once
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


@contextmanager
def _fail_fast_http():
    """No retries and a short timeout for the reachability probe only (training keeps MLflow's defaults)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def failure_reason(exc: Exception) -> str:
    """The short reason of a store failure ("connection refused", the first line of the error)."""
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host")):
        if needle in text:
            return short
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:160]


def probe(uri: str, timeout_s: float = 3.0) -> str | None:
    """Why the server at ``uri`` does not answer right now ("connection refused"), None when it does: one request
    to its ``/health`` page, without MLflow's retries (minutes while a server is down). None for a local store."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except Exception as exc:
        return failure_reason(exc)
    return f"HTTP {answer.status_code}" if answer.status_code >= 500 else None


def unreachable(exc: BaseException) -> bool:
    """The store did not answer a call (down, timed out, busy, a 5xx): the same call may pass later.
    Anything else is the store refusing it (an invalid value, a deleted run, a missing local file)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return code >= 500 or code in (408, 429) or _busy(exc)
    return _busy(exc)


@contextmanager
def _store_lock(db: Path | None):
    """Exclusive lock on ``<db>.lock`` while a local sqlite store is created or migrated: MLflow's
    schema creation is not safe when two workers (``--shard 0/2``, ``--shard 1/2``) start at once."""
    if db is None or db.name == ":memory:":
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _lock_needed(db: Path) -> bool:
    """A store that does not exist yet, or one created under the lock (its lock file is there:
    the creator may still be migrating it). A store made without it is complete and used as is."""
    return not db.exists() or db.with_name(db.name + ".lock").exists()


def _busy(exc: Exception) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text or "sqlite_busy" in text


def client(uri: str, attempts: int = 5):
    """An ``MlflowClient`` on ``uri`` after checking that the store answers (fail fast, one line).

    A local sqlite store is created (with its folder) here, under a file lock so that workers
    starting together create it once; a store busy with another writer is retried, then
    reported as busy. Nothing is created for a remote store.
    """
    quiet_mlflow()
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    for attempt in range(attempts):
        try:
            with _store_lock(db if db is not None and _lock_needed(db) else None):
                c = MlflowClient(tracking_uri=uri)
                with _fail_fast_http():
                    c.search_experiments(max_results=1)
            return c
        except Exception as exc:
            if db is not None and _busy(exc) and attempt + 1 < attempts:
                time.sleep(0.5 * 2 ** attempt)
                continue
            error = exc
            break
    if db is not None:
        if _busy(error):
            raise TrackingError(f"tracking store {uri} is busy (another process holds its lock: "
                                f"{failure_reason(error)}); retry in a moment") from None
        raise TrackingError(f"tracking store {uri} cannot be opened ({failure_reason(error)}); fix the path in "
                            "tracking.uri / MLFLOW_TRACKING_URI") from None
    if not_mlflow(uri, error):
        raise TrackingError(f"tracking store {uri} {not_mlflow(uri, error)}") from None
    raise TrackingError(
        f"tracking store {uri} is unreachable ({failure_reason(error)}); start it (mlflow server --host 127.0.0.1 "
        "--port PORT) or point tracking.uri / MLFLOW_TRACKING_URI at a reachable store"
    ) from None


def experiment_id(c, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name`` (created, or restored when deleted), tagged as model training (``tags.EXPERIMENT_KIND``)."""
    key, kind = tags.EXPERIMENT_KIND, tags.MODEL_TRAINING
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if exp.tags.get(key) != kind:  # experiments created before the tag existed
            c.set_experiment_tag(exp.experiment_id, key, kind)
        return exp.experiment_id
    loc = f"{artifact_root}/{name}" if artifact_root else None
    try:
        return c.create_experiment(name, artifact_location=loc, tags={key: kind})
    except Exception:  # created concurrently by another worker
        return c.get_experiment_by_name(name).experiment_id


def ui_page(base: str, uri: str, experiment: str | None = None) -> str:
    """The MLflow UI address that opens on the model-training view: the experiment's runs when it exists in
    ``uri`` (read-only: a missing local store is not created), else the experiment list."""
    page = "#/experiments"
    if experiment and not local_store_missing(uri):
        try:
            from mlflow import MlflowClient

            with _fail_fast_http():
                exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
            if exp is not None:
                page = f"#/experiments/{exp.experiment_id}"
        except Exception:  # an unreachable server: the list page still works once it is up
            pass
    return f"{base.rstrip('/')}/{page}?{tags.UI_WORKFLOW}"


def runs_with_hash(c, exp_id: str, config_hash: str) -> list:
    """Child runs of this config hash, newest first."""
    return c.search_runs(
        [exp_id], filter_string=tags.filter_equals(tags.CONFIG_HASH, config_hash), order_by=["attributes.start_time DESC"],
    )


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the rcnn-lab checkout that runs (not of the current folder);
    empty when rcnn-lab is installed from a wheel (not inside its own git checkout)."""
    package = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd or package, capture_output=True, text=True, timeout=10)

    try:
        top, head = git("rev-parse", "--show-toplevel"), git("rev-parse", "HEAD")
        if head.returncode != 0 or (cwd is None and Path(top.stdout.strip()).resolve() / package.name != package):
            return {}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {tags.GIT_COMMIT: head.stdout.strip(), tags.GIT_DIRTY: str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def versions() -> dict[str, str]:
    import torch
    import torchvision

    from rcnn_lab._version import __version__

    return {tags.VERSION: __version__, tags.TORCH: torch.__version__, tags.TORCHVISION: torchvision.__version__}


def common_tags(exp, world_size: int) -> dict[str, str]:
    """Tags every run of an invocation carries: the code's commit, library versions, experiment file, ranks."""
    return {**git_state(), **versions(), tags.EXPERIMENT_FILE: str(exp.path), tags.WORLD_SIZE: str(world_size)}


def start_sweep(c, exp_id: str, exp, plan, common: dict[str, str]) -> str:
    """A new sweep (parent) run of ``exp`` running ``plan``, claimed by this process (heartbeat: :class:`Heartbeat`); its id."""
    run = c.create_run(exp_id, run_name=sweep_name(exp, plan),
                       tags={**common, **claim_tags(), tags.KIND: tags.SWEEP, tags.PLAN_SIZE: str(len(plan)),
                             tags.PLAN_KEY: plan_key(exp, plan)})
    return run.info.run_id


def sweep_name(exp, plan) -> str:
    """What a sweep run holds, as its run name: ``tiny: b, small_rpn x seeds 0,1`` (``7 variants`` past three)."""
    variants = list(dict.fromkeys(r.variant.name for r in plan))
    seeds = list(dict.fromkeys(str(r.seed) for r in plan))
    what = ", ".join(variants) if len(variants) <= 3 else f"{len(variants)} variants"
    return f"{exp.name}: {what} x seed{'s' if len(seeds) > 1 else ''} {','.join(seeds)}"[:250]


def child_name(exp, run) -> str:
    """A child run's name: the variant and seed, then the experiment (names repeat across experiments)."""
    return f"{run.variant.name} s{run.seed} ({exp.name})"[:250]


def plan_key(exp, plan) -> str:
    """The same command (experiment, variants x seeds, configs) gives the same key: a rerun continues its sweep run."""
    import hashlib

    text = "\n".join([exp.tracking_name, *(r.hash for r in plan)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def beat() -> str:
    """The heartbeat tag's value: now, as UTC ISO 8601 (``2026-12-07T11:47:07Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def beat_time(text: str | None) -> float | None:
    """Seconds since the epoch of a heartbeat tag (ISO 8601 UTC, or the plain number older runs hold); None if unreadable."""
    import calendar

    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def claim_tags() -> dict[str, str]:
    return {tags.HOST: socket.gethostname(), tags.PID: str(os.getpid()), tags.HEARTBEAT: beat()}


class Heartbeat:
    """Refreshes a run's heartbeat tag from a daemon thread while it trains, long evaluations
    included, so other workers see a live claim (``claim_is_stale``) whatever the loop is doing."""

    def __init__(self, c, run_id: str, every_s: float = STALE_AFTER_S / 10):
        import threading

        self.c, self.run_id, self.every_s = c, run_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.c.set_tag(self.run_id, tags.HEARTBEAT, beat())
            except Exception:  # a store hiccup must not kill training; the next beat retries
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def claim_is_stale(run) -> bool:
    """A RUNNING run whose worker is gone: same host and dead pid, or a heartbeat older than STALE_AFTER_S."""
    seen = run.data.tags
    host, pid, last = seen.get(tags.HOST), seen.get(tags.PID), beat_time(seen.get(tags.HEARTBEAT))
    if host == socket.gethostname() and pid and pid.isdigit():
        if int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return last is None or time.time() - last > STALE_AFTER_S


def flatten_params(flat: dict) -> list:
    """Resolved config (dotted keys) as MLflow params (values as text, lists in JSON)."""
    import json

    from mlflow.entities import Param

    out = []
    for k, v in flat.items():
        text = v if isinstance(v, str) else json.dumps(v)
        out.append(Param(k, text[:6000]))
    return out


def final_metrics(run) -> dict:
    """The final evaluation a run logged (``final/<name>``), by name; {} for no run."""
    metrics = run.data.metrics if run else {}
    return {k[len(tags.FINAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(tags.FINAL_PREFIX)}
