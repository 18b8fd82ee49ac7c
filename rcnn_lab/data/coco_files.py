"""The image files a COCO index lists, checked before any run exists.

* Every build (``check_listed``): each listed file exists and is a file, not a folder (one
  directory listing per folder: about a second for COCO train2017's 118k files), and the headers of
  ``SAMPLE`` images spread evenly over the set are read (``rcnn_lab.data.images.image_size``: corrupt
  header, over the pixel limit, size other than the JSON's ``width`` x ``height``).
* On request (``check_headers``, ``rcnn-lab validate --data --deep``): every image's header, with a
  progress bar, read by a pool of processes (``$RCNN_LAB_CHECK_WORKERS``, default the cores up to 8). Files that passed before are remembered in the on-disk cache
  (``rcnn_lab.data.cache``, kind ``image-headers``: each file's size and mtime, keyed by the JSON
  file and the images folder), so a second deep check reads only files that changed since.

Headers only: a file whose header is sound but whose pixel data is damaged is found when it is
decoded (one line naming it, then; a run exists by then).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcnn_lab.data.cache import open_entry
from rcnn_lab.data.coco_index import CocoIndex
from rcnn_lab.data.images import ImageError, image_size
from rcnn_lab.errors import ConfigError, Problem, display_path

SAMPLE = 32  # headers read by every build
WORKERS_ENV = "RCNN_LAB_CHECK_WORKERS"  # processes reading headers for check_headers (default: the cores, up to 8)
_PART = 512  # headers per task
KIND, FORMAT = "image-headers", 1
_SHOWN = 8  # problems listed; the rest counted


def _listing(folder: Path) -> tuple[set[str], set[str]]:
    """Names of the files and of the folders in ``folder`` (both empty when it cannot be listed)."""
    files, folders = set(), set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    (folders if entry.is_dir() else files).add(entry.name)
                except OSError:
                    files.add(entry.name)
    except OSError:
        pass
    return files, folders


def _raise(problems: list[Problem], count: int, key: str = "images") -> None:
    if count > len(problems):
        problems.append(Problem(key, f"... and {count - len(problems)} more image problems"))
    raise ConfigError(problems)


def check_listed(index: CocoIndex, rows: np.ndarray, root: Path, annotation_file: Path) -> None:
    """Every listed file exists and is a file; a sample's headers agree with the JSON (module docstring)."""
    listing: dict[str, tuple[set[str], set[str]]] = {}
    missing, folders = [], []
    for row in rows.tolist():
        name = index.file_name(row)
        folder, base = os.path.split(name)
        if folder not in listing:
            listing[folder] = _listing(root / folder)
        files, dirs = listing[folder]
        if base in dirs:
            folders.append(row)
        elif base not in files:
            missing.append(name)
    file = display_path(annotation_file)
    if folders:
        row = folders[0]
        more = f" (and {len(folders) - 1} more)" if len(folders) > 1 else ""
        raise ConfigError([Problem("images", f"image id {index.image_ids[row]}: file_name '{index.file_name(row)}' "
                                   f"names a folder in '{display_path(root)}'{more}; name the image file", file)])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError([Problem("images", f"{len(missing)} image file(s) listed in {file} "
                                   f"are missing from '{display_path(root)}': {shown}; check the folder")])
    sample = rows[np.unique(np.linspace(0, len(rows) - 1, min(SAMPLE, len(rows))).round().astype(np.int64))] \
        if len(rows) else rows
    problems = [p for p in map(lambda r: header_problem(index, int(r), root, file), sample.tolist()) if p is not None]
    if problems:
        _raise(problems[:_SHOWN], len(problems))


def header_problem(index: CocoIndex, row: int, root: Path, file: str) -> Problem | None:
    """The problem of image ``row``'s header (unreadable, over the pixel limit, size unlike the JSON's), or None."""
    return _header_problem(os.path.join(root, index.file_name(row)), int(index.widths[row]), int(index.heights[row]),
                           int(index.image_ids[row]), file)


def _header_problem(path: str, w: int, h: int, image_id: int, file: str) -> Problem | None:
    try:
        width, height = image_size(path)
    except ImageError as exc:
        return Problem("images", f"{exc.reason} (image id {image_id} of {file}); {exc.fix}", exc.file)
    if (width, height) != (w, h):
        return Problem("images", f"'{display_path(path)}' is {width}x{height} (WxH) but {file} says {w}x{h} for image id "
                       f"{image_id}; fix width/height there, or the image")
    return None


def _check_part(part: list[tuple[int, str, int, int, int, int, int]], file: str) -> list[tuple[int, Problem | None]]:
    """Headers of ``(row, path, width, height, image id, size, mtime)``: each row's problem or None (pool worker)."""
    return [(row, _header_problem(path, w, h, image_id, file)) for row, path, w, h, image_id, _, _ in part]


@dataclass(frozen=True)
class HeaderReport:
    """What ``check_headers`` did: images checked, how many the cache vouched for, seconds, images per second."""

    images: int
    cached: int
    seconds: float

    @property
    def rate(self) -> float:
        read = self.images - self.cached
        return read / self.seconds if self.seconds > 0 else float("inf")


def _workers() -> int:
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def check_headers(index: CocoIndex, rows: np.ndarray, root: Path, annotation_file: Path, *, progress: bool = True,
                  cache: bool = True) -> HeaderReport:
    """Read every listed image's header (module docstring); ``ConfigError`` listing the problems found.

    Files whose size and mtime match a passed check in the cache are not read; the files that pass
    now are added to it.
    """
    from tqdm import tqdm

    file = display_path(annotation_file)
    entry = open_entry(KIND, FORMAT, annotation_file, {"images": str(root.resolve())}) if cache else None
    known = entry.load(lambda arrays, meta: (np.array(arrays["size"]), np.array(arrays["mtime_ns"]))) if entry else None
    if known is None or len(known[0]) != len(index):
        known = (np.full(len(index), -1, np.int64), np.full(len(index), -1, np.int64))
    sizes, mtimes = known
    started, count, problems, todo = time.perf_counter(), 0, [], []
    root_text, widths, heights, ids = str(root), index.widths, index.heights, index.image_ids
    for row in rows.tolist():
        path = os.path.join(root_text, index.file_name(row))
        try:
            st = os.stat(path)
        except OSError:
            todo.append((row, path, int(widths[row]), int(heights[row]), int(ids[row]), -1, -1))
            continue
        if sizes[row] != st.st_size or mtimes[row] != st.st_mtime_ns:
            todo.append((row, path, int(widths[row]), int(heights[row]), int(ids[row]), st.st_size, st.st_mtime_ns))
    cached = len(rows) - len(todo)
    parts = [todo[k:k + _PART] for k in range(0, len(todo), _PART)]
    workers = min(len(parts), _workers()) if len(todo) >= 4 * _PART else 1  # a pool pays off for thousands
    bar = tqdm(total=len(todo), desc=f"image headers of {annotation_file.name}", unit="img", file=sys.stderr,
               disable=not progress, mininterval=0.5, leave=False)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) if workers > 1 else None
    try:
        results = pool.map(_check_part, parts, [file] * len(parts)) if pool else (_check_part(p, file) for p in parts)
        for part, checked in zip(parts, results):
            for (row, _, _, _, _, size, mtime), (_, problem) in zip(part, checked):
                if problem is not None:
                    count += 1
                    if len(problems) < _SHOWN:
                        problems.append(problem)
                    sizes[row] = mtimes[row] = -1
                elif size >= 0:
                    sizes[row], mtimes[row] = size, mtime
            bar.update(len(part))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    report = HeaderReport(len(rows), cached, time.perf_counter() - started)
    if entry is not None and cached < len(rows):
        entry.replace({"size": sizes, "mtime_ns": mtimes}, {"images": str(root.resolve())})
    if problems:
        _raise(problems, count)
    return report
