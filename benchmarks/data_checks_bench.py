"""What the data checks cost at COCO scale: the JSON limits, the default preflight, ``validate --data --deep``.

Writes a seeded synthetic COCO file (``_coco_file.write_coco``: COCO's image sizes, polygons, 1 % crowd
RLE; images are hard links to one JPEG per size, so the files are in the page cache) at ``--scale``
of train2017's counts and measures, in this process:

* ``CocoDataset`` build without the cache (the JSON read, checked against every limit, indexed),
  and the share of it the polygon coordinate limits take (``_polygons_ok`` beyond ``_polygon_lengths``);
* the default preflight's file checks (``check_listed``: one listing per folder, a sample of
  ``SAMPLE`` headers);
* ``check_headers`` (``validate --data --deep``): every header read, then again with the cache
  vouching for the unchanged files.

Run from the repository root::

    python benchmarks/data_checks_bench.py --scale 0.1     # ~12k images; writes a section of docs/benchmarks/data.md
    python benchmarks/data_checks_bench.py --smoke          # seconds, nothing written
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from _coco_file import write_coco
from _publish import publish_section

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks" / "data.md"
SECTION = "Data checks at COCO scale"


class _Ann(msgspec.Struct):
    segmentation: msgspec.Raw = msgspec.Raw(b"null")


class _File(msgspec.Struct):
    annotations: list[_Ann]


def polygon_share(raw: bytes) -> tuple[float, int]:
    """Seconds the coordinate limits add to the fast path's polygon check (``_polygons_ok`` less
    ``_polygon_lengths``), and how many coordinates the file holds."""
    from rcnn_lab.data.coco_json import _polygon_lengths, _polygons_ok

    texts = [a.segmentation for a in msgspec.json.decode(raw, type=_File).annotations
             if bytes(memoryview(a.segmentation)[:1]) == b"["]
    lengths_s = checked_s = 0.0
    count = 0
    for k in range(0, len(texts), 16384):
        chunk = texts[k:k + 16384]
        started = time.perf_counter()
        count += int(_polygon_lengths(chunk).sum())
        lengths_s += time.perf_counter() - started
        started = time.perf_counter()
        assert _polygons_ok(chunk)
        checked_s += time.perf_counter() - started
    return max(0.0, checked_s - lengths_s), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="fraction of train2017's 118,287 images / 803,507 instances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; nothing written")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    scale = 0.005 if args.smoke else args.scale
    n_images, n_instances = max(10, round(118_287 * scale)), max(50, round(803_507 * scale))
    sys.path.insert(0, str(ROOT))
    from rcnn_lab.data.coco import CocoDataset
    from rcnn_lab.data.coco_files import SAMPLE, _workers, check_headers, check_listed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["RCNN_LAB_CACHE"] = str(tmp / "cache")
        started = time.perf_counter()
        images, annotations = write_coco(tmp / "coco", n_images, n_instances, 0.01, args.seed)
        written = time.perf_counter() - started
        raw = annotations.read_bytes()
        started = time.perf_counter()
        ds = CocoDataset(images, annotations, cache=False)
        build = time.perf_counter() - started
        polygons, numbers = polygon_share(raw)
        started = time.perf_counter()
        check_listed(ds.index, ds._rows, ds.root, ds.annotation_file)
        listed = time.perf_counter() - started
        cold = check_headers(ds.index, ds._rows, ds.root, ds.annotation_file, progress=False)
        warm = check_headers(ds.index, ds._rows, ds.root, ds.annotation_file, progress=False)
    per = 118_287 / n_images
    lines = [
        f"`python benchmarks/data_checks_bench.py --scale {scale:g}` on {platform.machine()}, {os.cpu_count()} logical cores "
        f"(shared with other jobs: timings under load), Python {platform.python_version()}. A synthetic file of "
        f"{n_images:,} images and {n_instances:,} instances ({len(raw) / 2**20:,.0f} MB, written in {written:.0f} s); "
        "the images are hard links to one JPEG per size (in the page cache: header parsing, not disk reads, is measured).",
        "",
        "| step | time | per image | at train2017's 118,287 images |",
        "|---|---:|---:|---:|",
        f"| `CocoDataset` build, no cache (read, every limit checked, indexed) | {build:.2f} s | {build / n_images * 1e6:.0f} us "
        f"| ~{build * per:.0f} s |",
        f"| of which: the polygon coordinate limits ({numbers:,} coordinates) | {polygons:.2f} s "
        f"({polygons / build:.0%}) | | ~{polygons * per:.0f} s |",
        f"| default preflight: every file listed, {SAMPLE} headers read | {listed * 1e3:.0f} ms | {listed / n_images * 1e6:.1f} us "
        f"| ~{listed * per:.1f} s |",
        f"| `validate --data --deep`: every header read ({_workers()} processes) | {cold.seconds:.2f} s | {cold.rate:,.0f} images/s | ~{118_287 / cold.rate:.0f} s |",
        f"| again, unchanged files vouched for by the cache | {warm.seconds:.2f} s | {warm.images / warm.seconds:,.0f} images/s "
        f"| ~{118_287 / (warm.images / warm.seconds):.1f} s |",
    ]
    text = "\n".join(lines)
    print(text)
    if not (args.smoke or args.no_write):
        publish_section(f"## {SECTION}\n\n{text}", REPORT)


if __name__ == "__main__":
    main()
