"""The COCO index from the on-disk cache: the same dataset as a parse, never stale, never fatal.

The cache root is a fresh temporary folder per test (tests/conftest.py sets ``RCNN_LAB_CACHE``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn_lab.data import cache as cache_module
from rcnn_lab.data import coco as coco_module
from rcnn_lab.data.coco import CocoDataset
from rcnn_lab.data.coco_cache import ARRAYS, KIND
from rcnn_lab.errors import ConfigError
from tests.data.test_coco import tiny  # noqa: F401  (fixture)
from tests.data.test_coco_json import same_dataset


def root() -> Path:
    return Path(os.environ["RCNN_LAB_CACHE"])


def entries() -> list[Path]:
    folder = root() / KIND
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The files read for a parse (the cache's misses), in order."""
    calls: list[str] = []
    real = coco_module.read_coco_bytes

    def counted(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(coco_module, "read_coco_bytes", counted)
    return calls


def identical(a: CocoDataset, b: CocoDataset) -> None:
    """Every index array equal (the annotations' bytes too), and the same items, labels and ground truth."""
    for name in ARRAYS:
        x, y = getattr(a.index, name), getattr(b.index, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.index.strict_json == b.index.strict_json and a._label == b._label
    same_dataset(a, b)
    assert a.coco().dataset == b.coco().dataset


@pytest.mark.parametrize("options", [{}, {"crowd": "keep"}, {"remove_images_without_annotations": True},
                                     {"category_ids": [7]}, {"max_images": 2}])
def test_a_cached_build_is_the_parsed_dataset(tiny, parses, options):  # noqa: F811
    images, ann, _ = tiny
    fresh = CocoDataset(images, ann, **options, cache=False)
    first, second = CocoDataset(images, ann, **options), CocoDataset(images, ann, **options)
    assert parses == ["annotations.json"] * 2  # the uncached build and the first cached one
    identical(fresh, first)
    identical(fresh, second)
    identical(fresh, pickle.loads(pickle.dumps(second)))  # what a spawned DataLoader worker receives
    assert len(entries()) == 1


def test_a_second_build_does_not_parse(tiny, monkeypatch):  # noqa: F811
    images, ann, _ = tiny
    first = CocoDataset(images, ann)

    def no_parse(*args):
        raise AssertionError("parsed again")

    for name in ("read_coco_bytes", "parse_fast", "parse_checked", "parse_coco_json"):
        monkeypatch.setattr(coco_module, name, no_parse)
    identical(first, CocoDataset(images, ann))


def test_the_mapped_index_is_read_only(tiny):  # noqa: F811
    images, ann, _ = tiny
    CocoDataset(images, ann)
    for ds in (CocoDataset(images, ann), CocoDataset(images, ann)):  # the build that stored it maps the entry too
        assert not any(getattr(ds.index, name).flags.writeable for name in ARRAYS)
        with pytest.raises(ValueError, match="read-only"):
            ds.index.boxes[0, 0] = 1.0


def test_arguments_applied_after_the_index_share_one_entry(tiny, parses):  # noqa: F811
    images, ann, _ = tiny
    CocoDataset(images, ann)
    CocoDataset(images, ann, crowd="keep", remove_images_without_annotations=True, max_images=1)
    assert len(parses) == 1 and len(entries()) == 1


def test_category_ids_are_separate_entries(tiny, parses):  # noqa: F811
    images, ann, _ = tiny
    selected = {"all": CocoDataset(images, ann), "7": CocoDataset(images, ann, category_ids=[7]),
                "3,7": CocoDataset(images, ann, category_ids=[3, 7])}
    assert len(parses) == 3 and len(entries()) == 3
    again = CocoDataset(images, ann, category_ids=[7, 3, 7])  # order and repeats change nothing
    assert len(parses) == 3
    identical(selected["3,7"], again)
    assert selected["7"].categories == [{"id": 7, "name": "seven"}] and selected["7"].index.num_annotations == 2


def test_a_touched_file_rebuilds_and_replaces_its_entry(tiny, parses):  # noqa: F811
    images, ann, _ = tiny
    CocoDataset(images, ann)
    old = entries()
    st = ann.stat()
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    CocoDataset(images, ann)
    assert len(parses) == 2 and len(entries()) == 1 and entries() != old  # the old file's entry is removed


def test_a_changed_file_is_never_served_stale(tiny, parses):  # noqa: F811
    images, ann, data = tiny
    CocoDataset(images, ann)
    st = ann.stat()
    data["annotations"] = data["annotations"][:-1]  # the annotation of image 12
    ann.write_text(json.dumps(data))
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, other size
    ds = CocoDataset(images, ann)
    assert len(parses) == 2 and ds.index.num_annotations == 5 and ds[2][1]["boxes"].shape == (0, 4)
    identical(ds, CocoDataset(images, ann, cache=False))


def test_a_file_changed_during_the_parse_is_not_stored(tiny, monkeypatch):  # noqa: F811
    images, ann, _ = tiny
    real = coco_module.read_coco_bytes

    def read_then_touch(path):
        raw = real(path)
        st = ann.stat()
        os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # as if rewritten after the read
        return raw

    monkeypatch.setattr(coco_module, "read_coco_bytes", read_then_touch)
    ds = CocoDataset(images, ann)
    assert entries() == [] and len(ds) == 3


def corrupt(entry: Path, how: str) -> None:
    if how == "truncated":
        data = (entry / "boxes.npy").read_bytes()
        (entry / "boxes.npy").write_bytes(data[:len(data) // 2])
    elif how == "missing":
        (entry / "ann_json.npy").unlink()
    elif how == "garbled json":
        (entry / "entry.json").write_text('{"key": {"kind": "coco-ind')
    elif how == "wrong shape":  # entry.json agrees with the file, but the index does not fit together
        widths = np.load(entry / "widths.npy")
        np.save(entry / "widths.npy", widths[:-1])
        meta = json.loads((entry / "entry.json").read_text())
        meta["arrays"]["widths"]["shape"] = [len(widths) - 1]
        (entry / "entry.json").write_text(json.dumps(meta))
    elif how == "no entry.json":
        (entry / "entry.json").unlink()


@pytest.mark.parametrize("how", ["truncated", "missing", "garbled json", "wrong shape", "no entry.json"])
def test_a_corrupt_entry_warns_once_and_is_rebuilt(tiny, parses, capsys, how):  # noqa: F811
    images, ann, _ = tiny
    fresh = CocoDataset(images, ann, cache=False)  # not mapping the entry that is damaged in place below
    CocoDataset(images, ann)
    [entry] = entries()
    corrupt(entry, how)
    capsys.readouterr()
    rebuilt = CocoDataset(images, ann)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rcnn-lab: warning: cache entry {entry} is unreadable (")
    assert lines[0].endswith("; rebuilding it")
    assert len(parses) == 3
    identical(fresh, rebuilt)
    identical(fresh, CocoDataset(images, ann))  # the entry is whole again: no further parse, no warning
    assert len(parses) == 3 and capsys.readouterr().err == "" and entries() == [entry]


def test_an_unwritable_root_prints_one_line_and_works_uncached(tiny, parses, capsys, monkeypatch, tmp_path):  # noqa: F811
    images, ann, _ = tiny
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # a file where the cache folder should be: nothing can be written under it
    monkeypatch.setenv("RCNN_LAB_CACHE", str(blocked))
    fresh = CocoDataset(images, ann, cache=False)
    capsys.readouterr()
    a, b = CocoDataset(images, ann), CocoDataset(images, ann)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rcnn-lab: warning: cache folder {blocked} is not writable (")
    assert len(parses) == 3
    identical(fresh, a)
    identical(fresh, b)


def test_off_builds_without_the_cache(tiny, parses, monkeypatch, tmp_path):  # noqa: F811
    images, ann, _ = tiny
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("RCNN_LAB_CACHE", "off")
    CocoDataset(images, ann)
    CocoDataset(images, ann)
    assert len(parses) == 2 and list(home.iterdir()) == [] and not xdg.exists()


def test_the_cache_argument_turns_it_off(tiny, parses):  # noqa: F811
    images, ann, _ = tiny
    CocoDataset(images, ann, cache=False)
    CocoDataset(images, ann, cache=False)
    assert len(parses) == 2 and not (root() / KIND).exists()


def test_progress_says_where_the_index_came_from(tiny, capsys):  # noqa: F811
    images, ann, _ = tiny
    CocoDataset(images, ann, progress=True)
    cold = capsys.readouterr().err.splitlines()
    CocoDataset(images, ann, progress=True)
    warm = capsys.readouterr().err.splitlines()
    [entry] = entries()
    assert [line.split(": ")[2].split()[0] for line in cold] == ["read", "parsed", "checked", "stored", "indexed", "found"]
    assert cold[3].startswith(f"rcnn-lab: coco annotations.json: stored the index in the cache {entry} (")
    assert [line.split(": ")[2].split()[0] for line in warm] == ["index", "indexed", "found"]
    assert warm[0].startswith(f"rcnn-lab: coco annotations.json: index from cache {entry} (") and warm[0].endswith(" s)")


@pytest.mark.parametrize("change", ["invalid json", "unknown image id", "bad category_ids"])
def test_file_errors_are_reported_as_without_the_cache_and_never_stored(tiny, change):  # noqa: F811
    images, ann, data = tiny
    options = {"category_ids": [99]} if change == "bad category_ids" else {}
    if change == "invalid json":
        ann.write_text(json.dumps(data)[:-5])
    elif change == "unknown image id":
        data["annotations"][0]["image_id"] = 404
        ann.write_text(json.dumps(data))

    def message(**kwargs) -> str:
        with pytest.raises(ConfigError) as exc:
            CocoDataset(images, ann, **options, **kwargs)
        return str(exc.value)

    expected = message(cache=False)
    assert message() == expected and message() == expected
    assert entries() == []


def test_a_missing_file_is_reported_as_without_the_cache(tmp_path):
    def message(**kwargs) -> str:
        with pytest.raises(ConfigError) as exc:
            CocoDataset(tmp_path, tmp_path / "nope.json", **kwargs)
        return str(exc.value)

    assert message() == message(cache=False) and "nope.json' does not exist" in message()


def _build(images: Path, ann: Path, log: Path, locks: bool, start, results) -> None:
    """One of the racing processes (forked): build the dataset, send back what it holds."""
    if not locks:
        cache_module.fcntl = None
    real = coco_module.read_coco_bytes

    def counted(path):
        with open(log, "a") as f:
            f.write("parse\n")
        return real(path)

    coco_module.read_coco_bytes = counted
    start.wait(30)
    ds = CocoDataset(images, ann)
    results.put((ds.to_coco_dict(), {name: getattr(ds.index, name).tobytes() for name in ARRAYS}))


@pytest.mark.parametrize("locks", [True, False], ids=["one-builds", "both-build"])
def test_two_processes_building_at_once(tiny, tmp_path, locks):  # noqa: F811
    images, ann, _ = tiny
    fresh = CocoDataset(images, ann, cache=False)
    expected = (fresh.to_coco_dict(), {name: getattr(fresh.index, name).tobytes() for name in ARRAYS})
    ctx = multiprocessing.get_context("fork")
    start, results, log = ctx.Barrier(2), ctx.Queue(), tmp_path / "parses.log"
    workers = [ctx.Process(target=_build, args=(images, ann, log, locks, start, results)) for _ in range(2)]
    for w in workers:
        w.start()
    got = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    assert got == [expected, expected]
    assert len(entries()) == 1 and not [p for p in (root() / KIND).iterdir() if p.name.startswith(".tmp-")]
    parsed = log.read_text().count("parse")
    assert parsed == 1 if locks else 1 <= parsed <= 2  # with the lock the second waits and maps the first's entry
    assert torch.equal(CocoDataset(images, ann)[0][0], fresh[0][0])
