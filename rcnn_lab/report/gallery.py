"""The prediction gallery of an experiment: one grid, rows = variants, columns = the gallery images.

Every run with ``eval.gallery: N`` stores its last evaluation's panels as ``gallery/<image id>.png``
(``runner.hooks.GalleryHook``; ground truth left, predictions right). The grid takes, per variant,
the newest finished run of one seed (``seed``; default: the lowest seed every variant has), so a
column shows the same validation image through every variant.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.report.data import fetch_artifacts, latest_finished

ARTIFACT = "gallery"


def _seed(done: pd.DataFrame, seed: int | None) -> int:
    seeds = {int(s) for s in done["seed"].dropna()}
    if seed is not None:
        if seed not in seeds:
            raise ConfigError([Problem("--seed", f"no finished run with seed {seed} (seeds: {', '.join(map(str, sorted(seeds)))})")])
        return seed
    common = set.intersection(*({int(s) for s in g["seed"].dropna()} for _, g in done.groupby("variant"))) if len(done) else set()
    return min(common or seeds)


def gallery_panels(df: pd.DataFrame, seed: int | None = None, tracking_uri: str | None = None
                   ) -> tuple[int, dict[tuple[str, str], dict[int, np.ndarray]]]:
    """-> (seed, {(experiment, variant): {image id: panel as uint8 [H, W, 3]}}) from the runs' ``gallery/`` artifacts."""
    from PIL import Image

    done = latest_finished(df)
    if done.empty:
        raise ConfigError([Problem("--gallery", "no finished run to draw; run `rcnn-lab run EXP.yaml` first")])
    chosen = _seed(done, seed)
    rows = done[done["seed"] == chosen].drop_duplicates(["experiment", "variant"], keep="last")
    out: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = fetch_artifacts(rows, ARTIFACT, tmp, tracking_uri)
        for _, r in rows.iterrows():
            folder = folders.get(r["run_id"])
            if folder is None:
                continue
            out[(r["experiment"], r["variant"])] = {
                int(p.stem): np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.png")) if p.stem.isdigit()
            }
    if not out:
        raise ConfigError([Problem("--gallery", f"no run with seed {chosen} logged a gallery; set eval.gallery: N "
                                   "(validation images to draw) and rerun")])
    return chosen, out


def plot_gallery(df: pd.DataFrame, path: str | Path, seed: int | None = None, tracking_uri: str | None = None) -> Path:
    """Write the gallery grid PNG (rows: variants; columns: images; one seed) and return its path."""
    from rcnn_lab.report.plots import _figure

    chosen, panels = gallery_panels(df, seed, tracking_uri)
    ids = sorted({i for p in panels.values() for i in p})
    many = len({e for e, _ in panels}) > 1
    h, w = next(iter(next(iter(panels.values())).values())).shape[:2]
    scale = 0.75 / 100  # inches per pixel at 100 dpi, panels drawn at 75 %
    fig, _ = _figure(max(4.0, len(ids) * w * scale + 1.2), len(panels) * h * scale + 0.8)
    fig.clear()
    axes = np.atleast_2d(fig.subplots(len(panels), len(ids), squeeze=False))
    for r, ((experiment, variant), images) in enumerate(panels.items()):
        for c, image_id in enumerate(ids):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if image_id in images:
                ax.imshow(images[image_id])
            if r == 0:
                ax.set_title(f"image {image_id}: ground truth | predictions", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{experiment}/{variant}" if many else str(variant), fontsize=9)
    from rcnn_lab.engine.gallery import SCORE_THRESHOLD  # late: the engine imports torch; a report without a gallery does not

    fig.suptitle(f"prediction gallery, seed {chosen} (detections with score >= {SCORE_THRESHOLD:g})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
