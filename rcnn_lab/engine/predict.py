"""``rcnn-lab predict``'s engine: image files in, drawn pictures and one streamed COCO-results file out.

* :func:`find_images` turns the command's IMAGES (files and folders) into :class:`ImageInput` items,
  each with the name its picture gets under the output folder; problems are one-line errors
  raised before anything is written.
* :func:`predict_images` reads the images (``data.images.read_image``: any mode, 16-bit, EXIF
  orientation) in loader workers, runs the model in batches on the device, appends the detections
  to ``results.json`` as it goes (:class:`ResultsWriter`) and draws each picture
  (``engine.gallery.draw_detections``) in a drawing thread while the next batch runs (at most one
  batch behind): memory stays flat over any number of images.
* An image that cannot be read is one line naming it; the others go on, and the summary counts it.

``image_id`` in the results file is the image's position in the input order (1-based); each
result also carries ``file_name``, the input path as the per-image lines print it.
Detections below the score threshold are neither drawn nor written, and the model's box score
threshold is raised to it before the forward pass, so masks of detections that would be dropped
are never pasted (same detections above the threshold, less time).

Not to be confused with ``engine.evaluate.predict``, the evaluation loop over a dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rcnn_lab.data.images import IMAGE_SUFFIXES, ImageError, read_image
from rcnn_lab.errors import ConfigError, Problem, display_path, excerpt

RESULTS = "results.json"
PICTURES = "images"  # the drawn pictures' folder under --out


@dataclass(frozen=True)
class ImageInput:
    """One image to predict on: its file and the relative name its picture gets (``<name>.png``)."""

    path: Path
    name: str

    @property
    def shown(self) -> str:
        return display_path(self.path)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def find_images(inputs: Sequence[str], key: str = "IMAGES", exclude: Path | None = None) -> list[ImageInput]:
    """The image files among ``inputs`` (files, and folders searched recursively for image suffixes), in order.

    A named file must exist and have an image suffix; a folder must hold at least one image. The
    names keep folders' inner structure (``folder/sub/x.jpg`` -> ``sub/x``); a name met twice gets
    ``-2``, ``-3`` ... Folder searches skip ``exclude`` (the output folder: an earlier run's pictures
    are not inputs). Raises one ``ConfigError`` naming ``key`` and every problem.
    """
    skip = Path(exclude).expanduser().resolve() if exclude is not None else None
    problems: list[Problem] = []
    found: list[Path] = []
    names: list[str] = []
    suffixes = ", ".join(IMAGE_SUFFIXES)
    if not inputs:
        raise ConfigError([Problem(key, "no image given; name image files or folders")])
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            try:
                files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p) and not p.name.startswith(".")
                               and (skip is None or not p.resolve().is_relative_to(skip)))
            except OSError as exc:
                problems.append(Problem(key, f"cannot list folder {excerpt(text)} ({exc.strerror}); make it readable"))
                continue
            if not files:
                problems.append(Problem(key, f"folder {excerpt(text)} holds no image file ({suffixes}); "
                                             "name a folder with images"))
            for file in files:
                found.append(file)
                names.append(file.relative_to(path).with_suffix("").as_posix())
        elif path.is_file():
            if not _is_image(path):
                problems.append(Problem(key, f"{excerpt(text)} is not an image file (expected one of {suffixes}); "
                                             "remove it from the command"))
                continue
            found.append(path)
            names.append(path.stem)
        elif path.exists():
            problems.append(Problem(key, f"{excerpt(text)} is neither a file nor a folder; name image files or folders"))
        else:
            problems.append(Problem(key, f"{excerpt(text)} does not exist; check the path"))
    if problems:
        raise ConfigError(list({str(p): p for p in problems}.values()))
    seen: dict[str, int] = {}
    items = []
    for path, name in zip(found, names):
        count = seen.get(name.lower(), 0) + 1
        seen[name.lower()] = count
        items.append(ImageInput(path, name if count == 1 else f"{name}-{count}"))
    return items


def check_out(out: str | Path, key: str = "--out") -> Path:
    """``--out`` as a folder that can be created or written; nothing is created here."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError([Problem(key, f"{display_path(path)} is a file; name a folder for the pictures and {RESULTS}")])
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError([Problem(key, f"{display_path(existing)} is a file, so {display_path(path)} cannot be created; "
                                        "name another folder")])
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([Problem(key, f"{display_path(existing)} is not writable; name a folder you can write to")])
    return path


class ResultsWriter:
    """A JSON array written one result at a time (valid JSON once closed, even after an interruption)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._file.write("[")
        self.count = 0

    def write(self, results: Iterable[dict]) -> None:
        for result in results:
            self._file.write(("\n" if self.count == 0 else ",\n") + json.dumps(result, separators=(",", ":")))
            self.count += 1
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]\n" if self.count else "]\n")
            self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Files(torch.utils.data.Dataset):
    """Items of the loader: ``(position, image or None, error line or None)``."""

    def __init__(self, items: Sequence[ImageInput]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, read_image(self.items[index].path), None
        except ImageError as exc:
            return index, None, str(exc)


def _batch(items: list) -> list:
    return items


@dataclass
class PredictSummary:
    """What :func:`predict_images` did."""

    images: int = 0  # predicted on
    failed: list[str] = field(default_factory=list)  # the error line of each image that could not be read
    detections: int = 0
    wall_s: float = 0.0
    inference_s: float = 0.0  # model forward only (CUDA-synchronised)
    results: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


@contextlib.contextmanager
def _score_floor(model: nn.Module, score: float):
    """Raise the model's box score threshold just under ``score`` for the block (``roi_heads.score_thresh``)."""
    heads = getattr(model, "roi_heads", None)
    old = getattr(heads, "score_thresh", None)
    if old is None:
        yield
        return
    below = float(np.nextafter(np.float32(score), np.float32(-np.inf)))  # torchvision keeps scores > thresh
    heads.score_thresh = max(old, below)
    try:
        yield
    finally:
        heads.score_thresh = old


def _kept(output: dict[str, torch.Tensor], score: float, num_categories: int) -> dict[str, torch.Tensor]:
    """The detections of one model output with ``score >= score`` and a label that has a category."""
    keep = (output["scores"] >= score) & (output["labels"] >= 1) & (output["labels"] <= num_categories)
    return {k: v[keep] for k, v in output.items() if k in ("boxes", "scores", "labels", "masks")}


def _draw(pictures: list[tuple[Path, torch.Tensor, list[dict], torch.Tensor | None]], categories, score: float) -> None:
    """Draw and write one batch's pictures (in the drawing thread: the next batch runs meanwhile)."""
    from rcnn_lab.data.export import write_png
    from rcnn_lab.engine.gallery import draw_detections

    for target, image, results, masks in pictures:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(draw_detections(image, results, categories, score, masks=masks), target)


def _line(item: ImageInput, results: list[dict], names: dict[int, str], limit: int = 5) -> str:
    counts: dict[str, int] = {}
    for r in results:
        name = names.get(int(r["category_id"]), str(r["category_id"]))
        counts[name] = counts.get(name, 0) + 1
    what = ", ".join(f"{n} {k}" for k, n in list(counts.items())[:limit]) + (", ..." if len(counts) > limit else "")
    plural = "s" if len(results) != 1 else ""
    return f"{item.shown}: {len(results)} detection{plural}" + (f" ({what})" if results else "")


def predict_images(model: nn.Module, items: Sequence[ImageInput], out: Path, categories: Sequence[dict[str, Any]],
                   device: torch.device, *, batch_size: int = 1, num_workers: int = 0, score: float = 0.5,
                   amp_dtype: torch.dtype | None = None, draw: bool = True, progress: bool = False) -> PredictSummary:
    """Predict on every item; pictures under ``out/images/``, detections streamed to ``out/results.json``.

    ``model`` is put in eval mode (its train/eval flags restored after); ``categories`` map labels
    (``i + 1`` is ``categories[i]``) to ids and names. The per-image lines go to stdout, the one
    line of each image that cannot be read to stderr (above the progress bar, when there is one).
    """
    from rcnn_lab.engine.evaluate import detections_to_coco

    started = time.perf_counter()
    out = Path(out)
    pictures = out / PICTURES
    pictures.mkdir(parents=True, exist_ok=True)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    summary = PredictSummary(results=out / RESULTS)
    loader = torch.utils.data.DataLoader(_Files(items), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_batch, pin_memory=device.type == "cuda")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True)

    def emit(line: str, stream) -> None:
        if bar is not None:
            bar.write(line, file=stream)
        else:
            print(line, file=stream)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with ResultsWriter(summary.results) as writer, torch.inference_mode(), _score_floor(model, score), \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-draw") as painter:
            pending = None
            for batch in loader:
                for *_, error in batch:
                    if error is not None:
                        summary.failed.append(error)
                        emit(f"skipped: {error}", sys.stderr)
                good = [(index, image) for index, image, error in batch if error is None]
                if good:
                    images = [image.to(device, non_blocking=True) for _, image in good]
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    tick = time.perf_counter()
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        outputs = model(images)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    summary.inference_s += time.perf_counter() - tick
                    drawn = []
                    for (index, image), output in zip(good, outputs):
                        item = items[index]
                        output = _kept(output, score, len(categories))
                        results = detections_to_coco([output], [index + 1], categories)  # one per kept row, in order
                        for r in results:
                            r["file_name"] = item.shown
                        writer.write(results)
                        if draw:
                            masks = (output["masks"][:, 0] > 0.5).cpu() if "masks" in output else None
                            drawn.append((pictures / f"{item.name}.png", image, results, masks))
                        summary.images += 1
                        summary.detections += len(results)
                        emit(_line(item, results, names), sys.stdout)
                    if pending is not None:
                        pending.result()  # at most one batch of pictures behind: memory stays flat
                    pending = painter.submit(_draw, drawn, categories, score) if drawn else None
                if bar is not None:
                    bar.update(len(batch))
            if pending is not None:
                pending.result()
    finally:
        for m, training in modes:
            m.training = training
        if bar is not None:
            bar.close()
    summary.wall_s = time.perf_counter() - started
    return summary
