"""Telling the user, within seconds, that the tracking store stopped answering, and when it answers again.

MLflow retries a refused connection for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, exponential backoff)
before the call that met it raises; training goes on meanwhile (``runner.journal``), but nothing would be
said until then. :class:`Watch` is shared by the journals of one invocation: a write that has been in flight
for ``slow_s`` makes it ask the server directly, once, without retries (``tracking.probe``); a refusal, or a
write that failed, is one line naming the time of the first failed write and what the command waits for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

SLOW_S = 5.0  # a write in flight this long makes the watch ask the server whether it answers
TICK_S = 1.0


def clock(since: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(since))


class Watch:
    """Shared by a sweep's journals: ``failed`` / ``answered`` from their shipping threads, one line per change.

    ``probe()`` -> why the store does not answer now, or None (``tracking.probe``); None: no probing (a local
    store fails at once). Use as a context manager: the probing thread runs inside it.
    """

    def __init__(self, uri: str, echo: Callable[[str], None], wait_s: float,
                 probe: Callable[[], str | None] | None = None, slow_s: float = SLOW_S):
        self.uri, self.echo, self.wait_s, self.probe, self.slow_s = uri, echo, wait_s, probe, slow_s
        self.since: float | None = None  # the first failed write of the current outage
        self._lock = threading.Lock()
        self._inflight: dict[object, float] = {}  # journal -> start of its write in flight
        self._probed: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tracking-watch", daemon=True)

    # --- from the journals' shipping threads ---------------------------------------------------

    def begin(self, journal, started: float) -> None:
        with self._lock:
            self._inflight[journal] = started

    def end(self, journal) -> None:
        with self._lock:
            self._inflight.pop(journal, None)

    def failed(self, since: float, reason: str) -> None:
        """A write that started at ``since`` met a store that does not answer: said once per outage."""
        with self._lock:
            if self.since is not None:
                return
            self.since = since
        self.echo(f"tracking store {self.uri} is not answering since {clock(since)} ({reason}): training goes on and "
                  "keeps its tracking writes on disk, stored as soon as the store answers; after the last run this "
                  f"command waits up to {self.wait_s:.0f} s for it, then leaves them for a rerun to store")

    def answered(self) -> None:
        with self._lock:
            if self.since is None:
                return
            since, self.since = self.since, None
        self.echo(f"tracking store {self.uri} answers again (it did not from {clock(since)}): storing the kept writes")

    # --- the probing thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            now = time.time()
            with self._lock:
                slow = [(j, t) for j, t in self._inflight.items() if now - t >= self.slow_s and (id(j), t) not in self._probed]
                self._probed.update((id(j), t) for j, t in slow)
            if not slow:
                continue
            reason = self.probe()
            if reason is not None:
                for j, started in slow:
                    j.outage_from(started, reason)

    def __enter__(self) -> Watch:
        if self.probe is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
