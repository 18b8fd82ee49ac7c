"""The on-disk cache of built indexes: where it lives, how entries are written, read and replaced.

Root: ``$RCNN_LAB_CACHE`` if set (``off`` turns the cache off), else ``$XDG_CACHE_HOME/rcnn-lab``,
else ``~/.cache/rcnn-lab``. An entry is a folder ``<root>/<kind>/<hash>/``: one ``.npy`` file per
array and ``entry.json`` (the key, each array's dtype and shape, the caller's small metadata).
The key is the source file (resolved path, size, ``st_mtime_ns``, inode), the caller's options
that change the result, the kind's format version and the package version; ``<hash>`` is its
sha256. A changed source file is a different key: a miss, never stale data (its older entries
are removed when the new one is stored).

Arrays load with ``np.load(mmap_mode="r")``: read-only, so every process on the machine that maps
an entry shares one page-cache copy. An entry is written into a temporary folder beside the
entries and renamed into place; a process that loses that race discards its copy. While one
process builds an entry, others asking for the same key wait for it (``flock`` on
``<hash>.lock``) and then map it instead of building it too.

The cache never fails a run: an entry that is unreadable or does not match its ``entry.json``
prints one warning line and is rebuilt; a root that cannot be written prints one line and the
build goes on uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rcnn_lab._version import __version__

try:
    import fcntl
except ImportError:  # not POSIX: no waiting for another builder (the rename still keeps entries whole)
    fcntl = None

CACHE_ENV = "RCNN_LAB_CACHE"
OFF = ("off", "0", "false", "no")  # values of $RCNN_LAB_CACHE that turn the cache off
ENTRY_FILE = "entry.json"
WAIT_S = 900.0  # longest wait for another process building the same entry; then build it too
_LEFTOVER_S = 3600.0  # temporary folders older than this were left by killed processes
_warned: set[str] = set()  # roots already reported unwritable in this process

T = TypeVar("T")


def cache_root() -> Path | None:
    """The cache folder, or None when ``$RCNN_LAB_CACHE`` turns the cache off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "rcnn-lab"


def warn(message: str) -> None:
    print(f"rcnn-lab: warning: {message}", file=sys.stderr, flush=True)


def source_key(path: Path) -> dict | None:
    """What identifies a source file's content: resolved path, size, mtime (ns), inode; None if not a file."""
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except (OSError, RuntimeError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


class Entry:
    """One cache entry: ``source`` built with ``options`` as ``kind`` (format ``version``)."""

    def __init__(self, root: Path, kind: str, version: int, source: dict, options: dict):
        self.key = {"kind": kind, "format": version, "package": __version__, "source": source, "options": options}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:24]
        self.root, self.parent = root, root / kind
        self.folder = self.parent / digest

    def current(self) -> bool:
        """The source file still is what the key says (not changed since the key was made)."""
        return source_key(Path(self.key["source"]["path"])) == self.key["source"]

    def load(self, decode: Callable[[dict[str, np.ndarray], dict], T]) -> T | None:
        """``decode(arrays, meta)`` of the entry (arrays memory-mapped, read-only); None when
        there is none. An unreadable entry, or one ``decode`` rejects (ValueError, KeyError,
        IndexError, TypeError), prints one warning line and is removed (the caller rebuilds it)."""
        if not self.folder.is_dir():
            return None
        try:
            text = (self.folder / ENTRY_FILE).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            return self._reject(f"{ENTRY_FILE}: {getattr(exc, 'strerror', None) or exc}")
        try:
            entry = json.loads(text)
            if entry["key"] != self.key:
                return self._reject("its entry.json holds another key")
            arrays = {name: self._array(name, spec) for name, spec in entry["arrays"].items()}
            return decode(arrays, entry["meta"])
        except (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError) as exc:
            if not self.folder.is_dir():
                return None  # replaced by another process meanwhile: a miss
            return self._reject(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _array(self, name: str, spec: dict) -> np.ndarray:
        path = self.folder / f"{name}.npy"
        empty = 0 in spec["shape"]
        array = np.load(path, mmap_mode=None if empty else "r", allow_pickle=False)
        if array.dtype.str != spec["dtype"] or list(array.shape) != spec["shape"]:
            raise ValueError(f"{name}.npy holds {array.dtype.str} {list(array.shape)}, entry.json says {spec['dtype']} {spec['shape']}")
        if empty:
            array.flags.writeable = False
        return np.asarray(array)  # a read-only ndarray view of the mapping

    def _reject(self, why: str) -> None:
        warn(f"cache entry {self.folder} is unreadable ({why}); rebuilding it")
        _discard(self.folder, self.parent)
        return None

    def store(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
        """Write the entry (atomically); False when it could not be written (one line said why).
        Entries of older versions of the same source file are removed."""
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.parent))
        except OSError as exc:
            if str(self.root) not in _warned:
                _warned.add(str(self.root))
                warn(f"cache folder {self.root} is not writable ({exc.strerror or exc}); building without the cache "
                     f"(set {CACHE_ENV} to a writable folder, or to off)")
            return False
        try:
            specs = {}
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
                specs[name] = {"dtype": array.dtype.str, "shape": list(array.shape)}
            (tmp / ENTRY_FILE).write_text(json.dumps({"key": self.key, "arrays": specs, "meta": meta}))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the entry from other users sharing the root
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            warn(f"could not write cache entry {self.folder} ({exc.strerror or exc}); going on without it")
            return False
        try:
            os.rename(tmp, self.folder)
        except OSError:  # another process stored it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        self._tidy()
        return True

    def replace(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
        """``store`` in place of the current entry (an updated record; ``store`` keeps an existing one)."""
        if self.folder.is_dir():
            _discard(self.folder, self.parent)
        return self.store(arrays, meta)

    def _tidy(self) -> None:
        """Remove entries of the same source path with another size/mtime, and old leftovers."""
        now = time.time()
        for child in self.parent.iterdir():
            try:
                if child.name.startswith((".tmp-", ".trash-")):
                    if now - child.stat().st_mtime > _LEFTOVER_S:
                        shutil.rmtree(child, ignore_errors=True)
                elif child.is_dir() and child != self.folder:
                    source = json.loads((child / ENTRY_FILE).read_text())["key"]["source"]
                    if source["path"] == self.key["source"]["path"] and source != self.key["source"]:
                        _discard(child, self.parent)
                        (self.parent / f"{child.name}.lock").unlink(missing_ok=True)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # another process's entry being replaced, or a corrupt one: its own load deals with it

    @contextlib.contextmanager
    def building(self, waiting: Callable[[], object] = lambda: None) -> Iterator[None]:
        """Hold the entry's build lock: one process builds an entry, others with the same key wait
        (calling ``waiting`` once) and then find it. No lock where one cannot be taken."""
        handle = None
        if fcntl is not None:
            with contextlib.suppress(OSError):
                self.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.parent / f"{self.folder.name}.lock", "a")  # noqa: SIM115 (closed below)
        try:
            if handle is not None and not _lock(handle, waiting):
                handle.close()
                handle = None
            yield
        finally:
            if handle is not None:
                if not self.folder.exists():  # a refused or failed build left no entry: leave no lock file either
                    with contextlib.suppress(OSError):
                        os.unlink(handle.name)
                    for folder in (self.parent, self.root):  # nor the folders made for it, when they hold nothing else
                        with contextlib.suppress(OSError):
                            folder.rmdir()
                handle.close()  # releases the lock


def _lock(handle, waiting: Callable[[], object]) -> bool:
    """Take an exclusive flock on ``handle``, waiting up to WAIT_S; False when it cannot be had."""
    deadline, told = time.monotonic() + WAIT_S, False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            if not told:
                waiting()
                told = True
            time.sleep(0.1)
        except OSError:  # a file system without locks
            return False


def _discard(folder: Path, parent: Path) -> None:
    """Remove an entry folder; processes that mapped its files keep reading them."""
    try:
        aside = Path(tempfile.mkdtemp(prefix=".trash-", dir=parent))
        os.rename(folder, aside / "entry")
    except OSError:  # gone already (another process), or not ours to remove
        return
    shutil.rmtree(aside, ignore_errors=True)


def open_entry(kind: str, version: int, source: Path, options: dict) -> Entry | None:
    """The entry for ``source`` built with ``options`` (JSON-able, normalised by the caller);
    None when the cache is off or ``source`` is not a readable file (the caller reports that)."""
    root = cache_root()
    key = source_key(source) if root is not None else None
    return Entry(root, kind, version, key, options) if key is not None else None
