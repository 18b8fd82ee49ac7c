"""The on-disk cache's rules: where it lives, atomic entries, lost races, tidying, the build lock."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rcnn_lab.data import cache
from rcnn_lab.data.cache import Entry, cache_root, open_entry, source_key


def test_the_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RCNN_LAB_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "rcnn-lab"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    assert cache_root() == tmp_path / "home" / ".cache" / "rcnn-lab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rcnn-lab"
    monkeypatch.setenv("RCNN_LAB_CACHE", "~/here")
    assert cache_root() == tmp_path / "home" / "here"
    for off in ("off", "OFF", "0", "false", "no"):
        monkeypatch.setenv("RCNN_LAB_CACHE", off)
        assert cache_root() is None
        assert open_entry("k", 1, Path(__file__), {}) is None


def test_source_key_identifies_a_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{}")
    key = source_key(tmp_path / "." / "a.json")
    assert key["path"] == str(path.resolve()) and key["size"] == 2 and key["mtime_ns"] == path.stat().st_mtime_ns
    assert source_key(tmp_path / "missing.json") is None and source_key(tmp_path) is None


def make_entry(tmp_path: Path, options: dict | None = None, source: Path | None = None) -> Entry:
    if source is None:
        source = tmp_path / "src.json"
        if not source.exists():
            source.write_text("{}")
    return open_entry("test-kind", 1, source, options or {})


def load(entry: Entry):
    return entry.load(lambda arrays, meta: (arrays, meta))


def test_an_entry_round_trips_memory_mapped_and_read_only(tmp_path):
    entry = make_entry(tmp_path)
    assert load(entry) is None  # nothing stored yet: a quiet miss
    arrays = {"a": np.arange(5, dtype=np.int64), "b": np.ones((2, 4)), "empty": np.zeros((0, 4), np.float64)}
    assert entry.store(arrays, {"x": [1, "y"]})
    got, meta = load(make_entry(tmp_path))
    assert meta == {"x": [1, "y"]} and sorted(got) == ["a", "b", "empty"]
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array) and not got[name].flags.writeable
    assert isinstance(got["a"].base, np.memmap)
    assert entry.folder.parent == Path(os.environ["RCNN_LAB_CACHE"]) / "test-kind" and len(entry.folder.name) == 24


def test_options_and_file_changes_are_other_entries(tmp_path):
    a = make_entry(tmp_path, {"ids": [1]})
    assert make_entry(tmp_path, {"ids": [1]}).folder == a.folder
    assert make_entry(tmp_path, {"ids": [2]}).folder != a.folder
    (tmp_path / "src.json").write_text("{ }")
    assert make_entry(tmp_path, {"ids": [1]}).folder != a.folder
    assert not a.current()


def test_the_loser_of_a_race_keeps_the_winners_entry(tmp_path):
    first, second = make_entry(tmp_path), make_entry(tmp_path)
    assert first.store({"a": np.array([1])}, {"who": "first"})
    assert second.store({"a": np.array([2])}, {"who": "second"})  # its rename fails: it discards its copy
    arrays, meta = load(second)
    assert meta == {"who": "first"} and arrays["a"].tolist() == [1]
    assert [p.name for p in first.parent.iterdir() if p.is_dir()] == [first.folder.name]


def test_storing_removes_older_versions_of_the_file_and_old_leftovers(tmp_path):
    other = tmp_path / "other.json"
    other.write_text("[]")
    for options in ({}, {"ids": [3]}):
        make_entry(tmp_path, options).store({"a": np.array([1])}, {})
    unrelated = make_entry(tmp_path, source=other)
    unrelated.store({"a": np.array([1])}, {})
    stale, busy = unrelated.parent / ".tmp-stale", unrelated.parent / ".tmp-busy"
    stale.mkdir()
    busy.mkdir()
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    (tmp_path / "src.json").write_text("{  }")  # a new version of the file
    kept = make_entry(tmp_path, {"ids": [3]})
    kept.store({"a": np.array([1])}, {})
    left = {p for p in kept.parent.iterdir() if p.is_dir()}
    assert left == {kept.folder, unrelated.folder, busy}  # both entries of the old version are gone


def test_a_second_builder_waits_for_the_first(tmp_path):
    entry = make_entry(tmp_path)
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with entry.building():
            inside.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    with make_entry(tmp_path).building(waiting=lambda: order.append("waiting")):
        order.append("second in")
    thread.join()
    assert order == ["waiting", "first done", "second in"]


def test_a_builder_stuck_too_long_is_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "WAIT_S", 0.2)
    entry = make_entry(tmp_path)
    with entry.building():
        start = time.monotonic()
        with make_entry(tmp_path).building():
            waited = time.monotonic() - start
    assert 0.2 <= waited < 5


@pytest.mark.parametrize("damage", ["entry.json", "array"])
def test_a_damaged_entry_is_reported_and_removed(tmp_path, capsys, damage):
    entry = make_entry(tmp_path)
    entry.store({"a": np.arange(1000)}, {})
    if damage == "entry.json":
        (entry.folder / "entry.json").write_text("[")
    else:
        (entry.folder / "a.npy").write_bytes((entry.folder / "a.npy").read_bytes()[:200])
    assert load(entry) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rcnn-lab: warning: cache entry {entry.folder} is unreadable (")
    assert not entry.folder.exists()
    assert load(entry) is None and capsys.readouterr().err == ""  # gone: a quiet miss until rebuilt


def test_a_refused_build_leaves_no_lock_file(tmp_path):
    entry = make_entry(tmp_path)
    with pytest.raises(ValueError), entry.building():
        raise ValueError("the source file is refused")  # e.g. a COCO file that fails validation
    assert not entry.folder.exists() and list(entry.parent.glob("*.lock")) == []
    with entry.building():  # a build that stores its entry keeps the lock file beside it (waiters use it)
        entry.store({"a": np.array([1])}, {})
    assert [p.name for p in entry.parent.glob("*.lock")] == [f"{entry.folder.name}.lock"]
