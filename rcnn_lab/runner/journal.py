"""A run's tracking writes go to disk first: training never waits for the tracking store.

Every write a run makes once it exists in MLflow (metric batches, tags, texts, figures, images,
artifacts, dataset inputs, its end status) is appended to ``<run output>/tracking/journal.jsonl``,
one JSON line each, and shipped in order by one background thread. While the store is unreachable,
that thread retries every ``retry_s`` and training goes on; the journal is bounded: past
``max_bytes`` of unshipped lines, per-step training metrics are dropped (and counted), while
evaluations, final metrics, artifacts and the run's end are always kept. ``sync`` puts the lines on
disk (fsync): the MLflow hook calls it before every checkpoint, so a checkpoint never holds steps
whose metrics could be lost.

A journal left with unshipped lines (the store was still down when the process ended, or it was
killed) is shipped by the next ``rcnn-lab run`` before it decides anything about that run
(:func:`replay`): a run that finished while the store was down is stored as FINISHED and is never
retrained, and its checkpoint is never discarded because tracking failed. Replays are idempotent
for metrics (MLflow ignores a point with the same key, step, value and timestamp).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from rcnn_lab.runner.tracking import failure_reason, unreachable

FOLDER = "tracking"  # under the run's output folder
RETRY_S = 30.0  # between attempts while the store is unreachable
COMPACT_BYTES = 1 << 20  # a fully shipped journal larger than this is emptied
MIB = 1 << 20


class JournalBusy(RuntimeError):
    """Another live process owns this journal (it trains that run)."""


def folder(out: Path) -> Path:
    return Path(out) / FOLDER


@dataclass
class Backlog:
    """What a journal has not stored (yet)."""

    run_id: str
    metrics: int = 0  # metric points
    files: int = 0  # artifacts and images
    tags: int = 0
    end: str | None = None  # the run's end status, when it is among the unstored writes
    dropped: int = 0  # per-step metric points never journaled (the journal was full)
    rejected: int = 0  # writes the store refused (logged nowhere); reason below
    reason: str = ""
    since: float | None = None  # the store has not answered since (time.time())
    outage: str = ""  # why

    @property
    def unstored(self) -> bool:
        return bool(self.metrics or self.files or self.tags or self.end)

    def describe(self) -> str:
        parts = [f"{n:,} {what}" for n, what in ((self.metrics, "metric points"), (self.files, "files"),
                                                  (self.tags, "tag writes")) if n]
        if self.end:
            parts.append(f"its end ({self.end})")
        return ", ".join(parts) or "nothing"


class Journal:
    """The on-disk, in-order tracking writes of run ``run_id`` (see the module docstring).

    ``start=False``: no background thread (:func:`replay` ships synchronously).
    """

    def __init__(self, client, run_id: str, where: Path, *, max_bytes: int = 256 * MIB,
                 retry_s: float | None = None, start: bool = True, watch=None):
        self.client, self.run_id, self.folder, self.watch = client, run_id, Path(where), watch  # watch: outage.Watch
        self.max_bytes, self.retry_s = max_bytes, RETRY_S if retry_s is None else retry_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self._owner = open(self.folder / "journal.lock", "a")
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends
        except BlockingIOError:
            self._owner.close()
            raise JournalBusy(str(self.folder)) from None
        _drop_torn_line(self.folder / "journal.jsonl")  # a process killed mid-write: later lines must start afresh
        lines = self._lines()  # read once: a journal left by an outage may be large
        unsent = self._unsent(lines)
        owner = self.folder / "run_id"
        if owner.exists() and owner.read_text().strip() != run_id and unsent:
            self._owner.close()
            raise RuntimeError(f"{self.folder} holds the unstored writes of run {owner.read_text().strip()}; replay them first")
        owner.write_text(run_id)
        self.queue: deque[tuple[int, dict, int]] = deque(unsent)  # (line index, entry, bytes)
        self.written = len(lines)
        self.sent = self.queue[0][0] if self.queue else self.written
        self.unsent_bytes = sum(n for _, _, n in self.queue)
        self.dropped = self.rejected = self._files = 0
        self.reason = ""
        self.outage: tuple[float, str] | None = None  # (since, reason) while the store does not answer
        self._file = open(self.folder / "journal.jsonl", "a", encoding="utf-8")
        self._cv = threading.Condition()
        self._closing = False
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._ship_loop, name=f"journal-{run_id[:8]}", daemon=True)
        if start:
            self._thread.start()

    # --- reading back -------------------------------------------------------------------------

    def _lines(self) -> list[str]:
        path = self.folder / "journal.jsonl"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def _unsent(self, lines: list[str]) -> list[tuple[int, dict, int]]:
        sent_file = self.folder / "journal.sent"
        sent = int(sent_file.read_text() or 0) if sent_file.exists() else 0
        out = []
        for i, line in enumerate(lines):
            if i >= sent:
                try:
                    out.append((i, json.loads(line), len(line) + 1))
                except ValueError:  # the last line of a process killed mid-write
                    break
        return out

    # --- writing (the training thread) --------------------------------------------------------

    def _append(self, entry: dict, droppable: bool = False) -> None:
        line = json.dumps(entry, separators=(",", ":"))
        with self._cv:
            if droppable and self.unsent_bytes + len(line) + 1 > self.max_bytes:
                self.dropped += len(entry.get("m", ()))
                return
            self._file.write(line + "\n")
            self._file.flush()
            self.queue.append((self.written, entry, len(line) + 1))
            self.written += 1
            self.unsent_bytes += len(line) + 1
            self._cv.notify_all()

    def metrics(self, points: list[tuple[str, float, int, int]], step_metrics: bool = False) -> None:
        """``(key, value, timestamp ms, step)`` points; ``step_metrics``: per-step training values (droppable)."""
        if points:
            self._append({"op": "metrics", "m": [[k, float(v), int(t), int(s)] for k, v, t, s in points]}, step_metrics)

    def tags(self, values: dict[str, str]) -> None:
        self._append({"op": "tags", "t": {k: str(v) for k, v in values.items()}})

    def _own_file(self, artifact_file: str) -> Path:
        self._files += 1  # a fresh folder per file: names repeat (eval/metrics.json), and lines are compacted away
        path = self.folder / "files" / f"{os.getpid()}-{self._files}" / Path(artifact_file).name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def text(self, content: str, artifact_file: str) -> None:
        path = self._own_file(artifact_file)
        path.write_text(content, encoding="utf-8")
        self.artifact(path, _parent(artifact_file))

    def figure(self, fig, artifact_file: str) -> None:
        path = self._own_file(artifact_file)
        fig.savefig(path)
        self.artifact(path, _parent(artifact_file))

    def image_file(self, image, artifact_file: str) -> None:
        """An image (PIL, or an HxWx3 uint8 array) stored as the artifact ``artifact_file`` (a PNG)."""
        path = self._own_file(artifact_file)
        _save_png(image, path)
        self.artifact(path, _parent(artifact_file))

    def image(self, image, key: str, step: int) -> None:
        """An image (PIL, or an HxWx3 uint8 array) as MLflow's stepped image ``key`` (the run page's image view)."""
        path = self._own_file(f"{key.replace('/', '_')}-{step}.png")
        _save_png(image, path)
        self._append({"op": "image", "path": str(path.resolve()), "key": key, "step": int(step),
                      "time": int(time.time() * 1000)})

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._append({"op": "artifact", "path": str(Path(path).resolve()), "dir": artifact_path})

    def inputs(self, datasets: list[dict]) -> None:
        self._append({"op": "inputs", "datasets": datasets})

    def end(self, status: str) -> None:
        self._append({"op": "end", "status": str(status), "time": int(time.time() * 1000)})

    def sync(self) -> None:
        """Every line written so far is on disk (before a checkpoint that holds those steps)."""
        with self._cv:
            self._file.flush()
            os.fsync(self._file.fileno())

    def wait_stored(self, timeout: float | None = None) -> bool:
        """Wait until every write is stored, or the store is found unreachable; True when all are stored."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self.queue and self.outage is None and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(left)
            return not self.queue

    # --- shipping (the background thread) -----------------------------------------------------

    def _ship_loop(self) -> None:
        while True:
            with self._cv:
                while not self.queue and not self._closing:
                    self._cv.wait()
                if not self.queue or self._abandon.is_set():
                    return
                index, entry, size = self.queue[0]
            if not self._ship_one(entry):
                if self._abandon.wait(self.retry_s):
                    return
                continue
            self._done(index, entry, size)

    def _ship_one(self, entry: dict) -> bool:
        """Store one write; False when the store is unreachable (retry later). A write the store refuses
        (bad value, missing file) is counted as rejected and not retried."""
        started = time.time()  # an outage dates from the first write that failed, not from when MLflow gave up on it
        if self.watch is not None:
            self.watch.begin(self, started)
        try:
            ship(self.client, self.run_id, entry)
        except Exception as exc:
            if not unreachable(exc):
                self.rejected += 1
                self.reason = self.reason or failure_reason(exc)
                return True
            self.outage_from(started, failure_reason(exc))
            return False
        finally:
            if self.watch is not None:
                self.watch.end(self)
        if self.outage is not None and self.watch is not None:
            self.watch.answered()
        self.outage = None
        return True

    def outage_from(self, since: float, reason: str) -> None:
        """The store does not answer a write that started at ``since`` (it failed, or ``watch``'s probe was refused)."""
        with self._cv:
            if self.outage is None:
                self.outage = (since, reason)
            self._cv.notify_all()
        if self.watch is not None:
            self.watch.failed(since, reason)

    def _done(self, index: int, entry: dict, size: int) -> None:
        with self._cv:
            if self._abandon.is_set():  # closed meanwhile: the journal on disk is the record (a replay re-sends it)
                return
            self.queue.popleft()
            self.sent = index + 1
            self.unsent_bytes -= size
            _write_atomic(self.folder / "journal.sent", str(self.sent))
            self._cv.notify_all()
            if entry.get("op") in ("artifact", "image") and str(self.folder / "files") in entry["path"]:
                Path(entry["path"]).unlink(missing_ok=True)
            if (not self.queue and not self._closing and self.written
                    and (self.folder / "journal.jsonl").stat().st_size > COMPACT_BYTES):
                self._file.truncate(0)
                self._file.seek(0)
                self.written = self.sent = 0
                _write_atomic(self.folder / "journal.sent", "0")

    def drain(self) -> None:
        """Ship everything now, on this thread (:func:`replay`); raises the store's error when it does not answer."""
        while self.queue:
            index, entry, size = self.queue[0]
            if not self._ship_one(entry):
                raise ConnectionError(self.outage[1] if self.outage else "the tracking store does not answer")
            self._done(index, entry, size)

    def close(self, outage_wait_s: float) -> Backlog:
        """Stop accepting writes and let the shipper store the rest: as long as it takes while the store
        answers, and at most ``outage_wait_s`` of an outage. Everything stored: the journal folder is
        removed. Otherwise it stays for :func:`replay`, and the backlog says what is in it."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        while self._thread.is_alive():
            self._thread.join(0.5)
            if self.outage is not None and time.time() - self.outage[0] >= outage_wait_s:
                break
        with self._cv:
            self._abandon.set()
            backlog = self.backlog()
            self._file.close()
        self._owner.close()
        if not backlog.unstored:
            shutil.rmtree(self.folder, ignore_errors=True)
        return backlog

    def backlog(self) -> Backlog:
        b = Backlog(self.run_id, dropped=self.dropped, rejected=self.rejected, reason=self.reason,
                    since=self.outage[0] if self.outage else None, outage=self.outage[1] if self.outage else "")
        for _, entry, _ in list(self.queue):
            op = entry.get("op")
            if op == "metrics":
                b.metrics += len(entry["m"])
            elif op in ("artifact", "image"):
                b.files += 1
            elif op == "tags":
                b.tags += len(entry["t"])
            elif op == "end":
                b.end = entry["status"]
        return b


def ship(c, run_id: str, entry: dict) -> None:
    """Perform one journaled write against the store."""
    op = entry["op"]
    if op == "metrics":
        from mlflow.entities import Metric

        points = [Metric(k, v, t, s) for k, v, t, s in entry["m"]]
        for i in range(0, len(points), 1000):  # MLflow accepts at most 1000 metrics per batch
            c.log_batch(run_id, metrics=points[i:i + 1000], synchronous=True)
    elif op == "tags":
        from mlflow.entities import RunTag

        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in entry["t"].items()], synchronous=True)
    elif op == "artifact":
        if not Path(entry["path"]).exists():
            raise FileNotFoundError(entry["path"])
        c.log_artifact(run_id, entry["path"], entry.get("dir"))
    elif op == "image":
        from PIL import Image

        with Image.open(entry["path"]) as image:
            c.log_image(run_id, image.copy(), key=entry["key"], step=entry["step"], timestamp=entry["time"],
                        synchronous=True)
    elif op == "inputs":
        from rcnn_lab.runner.inputs import log_inputs

        log_inputs(c, run_id, entry["datasets"])
    elif op == "end":
        c.set_terminated(run_id, entry["status"], end_time=entry["time"])
    else:
        raise ValueError(f"unknown journal entry {op!r}")


def replay(c, where: Path) -> Backlog | None:
    """Store what an earlier invocation left in the journal at ``where``; None when there is none
    (or a live process owns it). Returns what was stored; raises ``ConnectionError`` when the store
    stops answering midway (the rest stays on disk)."""
    if not (Path(where) / "journal.jsonl").exists() or not (Path(where) / "run_id").exists():
        return None
    run_id = (Path(where) / "run_id").read_text().strip()
    try:
        j = Journal(c, run_id, where, start=False)
    except JournalBusy:
        return None
    stored = j.backlog()
    try:
        j.drain()
    finally:
        rest = j.close(0)  # the lock is released; what was not stored stays on disk
    stored.rejected, stored.reason = rest.rejected, rest.reason
    return stored


def _parent(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent in ("", ".") else parent


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (the write of a killed process) off the journal at ``path``."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _save_png(image, path: Path) -> None:
    if not hasattr(image, "save"):
        import numpy as np
        from PIL import Image

        image = Image.fromarray(np.asarray(image))
    image.save(path, format="PNG")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
