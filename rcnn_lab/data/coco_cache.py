"""A COCO file's checked index in the on-disk cache (:mod:`rcnn_lab.data.cache`): parsed once, mapped after.

An entry holds everything a successful parse gives the dataset (``ParsedCoco``): the
``CocoIndex`` arrays (one ``.npy`` each), its ``strict_json`` flag, the selected categories and
their labels. The key holds the file (path, size, mtime, inode) and ``category_ids``, the only
argument that changes the parse; ``crowd``, ``remove_images_without_annotations`` and
``max_images`` apply to the loaded index. Files with errors are never stored: each build reports
them as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from rcnn_lab.data.cache import open_entry
from rcnn_lab.data.coco_index import CocoIndex, Progress
from rcnn_lab.data.coco_json import ParsedCoco

KIND = "coco-index"
FORMAT = 2  # bump when the entry's arrays or metadata change meaning, or what a file must pass (2: areas checked)
ARRAYS = [name for name in CocoIndex.__dataclass_fields__ if name != "strict_json"]


def options(category_ids: list[int] | None) -> dict:
    """The constructor arguments that change the parse, normalised (order and repeats do not)."""
    return {"category_ids": None if category_ids is None else sorted(set(category_ids))}


def to_entry(parsed: ParsedCoco) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the metadata of a cache entry for ``parsed``."""
    index = parsed.index
    meta = {"strict_json": index.strict_json, "categories": parsed.categories,
            "labels": [[category, label] for category, label in parsed.label.items()]}
    return {name: getattr(index, name) for name in ARRAYS}, meta


def from_entry(arrays: dict[str, np.ndarray], meta: dict) -> ParsedCoco:
    """``ParsedCoco`` of a cache entry; ValueError/KeyError/TypeError when they do not make one."""
    index = CocoIndex(**{name: arrays[name] for name in ARRAYS}, strict_json=bool(meta["strict_json"]))
    problem = index.problem()
    if problem is not None:
        raise ValueError(problem)
    categories = [dict(c) for c in meta["categories"]]
    label = {int(category): int(value) for category, value in meta["labels"]}
    if sorted(label) != [c["id"] for c in categories]:
        raise ValueError("labels do not match the categories")
    return ParsedCoco(categories, label, index)


def load_or_parse(path: Path, category_ids: list[int] | None, parse: Callable[[], ParsedCoco], report: Progress,
                  *, cache: bool = True) -> ParsedCoco:
    """The cached parse of ``path`` when there is a current one, else ``parse()``, stored for next time.

    After storing, the process maps the stored entry too, so its memory is shared like every
    later build's. Another process building the same entry is waited for (and its entry used).
    """
    entry = open_entry(KIND, FORMAT, path, options(category_ids)) if cache else None
    if entry is None:
        return parse()
    found = entry.load(from_entry)
    if found is None:
        with entry.building(waiting=lambda: report("waiting for another process building this index")):
            found = entry.load(from_entry)  # stored meanwhile by the process waited for
            if found is None:
                parsed = parse()
                if not (entry.current() and entry.store(*to_entry(parsed))):  # a file changed meanwhile is not stored
                    return parsed
                mapped = entry.load(from_entry)
                if mapped is not None:
                    report(f"stored the index in the cache {entry.folder}")
                return mapped if mapped is not None else parsed
    report(f"index from cache {entry.folder}")
    return found
