"""COCO-size annotation files: build time, peak memory, worker memory, evaluation time.

Writes a seeded synthetic COCO file of train2017's size itself (118,287 images of COCO's usual
sizes, 803,507 instances with polygons, 1 % crowd RLE; the images are hard links to one JPEG
per size) and measures, each in a fresh process so peak RSS is its own:

* ``json.load`` of the file, pycocotools ``COCO(file)`` and ``CocoDataset(images, file)``:
  wall time, peak RSS, and for the dataset the bytes its index holds after the build;
* the on-disk cache of the index (``rcnn_lab.data.coco_cache``, in a temporary folder): that
  first build stores it; a second build in a fresh process maps it (time, peak RSS); N fresh
  processes mapping it at once (the PSS of the mapped index and of each whole process);
* a DataLoader with 4 workers over the dataset reading random items: the PSS of the main
  process and of the workers after 100 and after 20,000 items, and items/s per worker;
* at val2017's size (5,000 images, 36,781 instances, 100 detections per image): building the
  ground truth (``CocoDataset`` + ``coco()``) and one full bbox + segm evaluation with each
  backend (pycocotools and faster-coco-eval).

Run from the repository root::

    python benchmarks/coco_scale_bench.py              # full size (a few GB RAM, some minutes); writes docs/benchmarks/coco_scale.md
    python benchmarks/coco_scale_bench.py --scale 0.02 --no-write   # 2 % of every count
    python benchmarks/coco_scale_bench.py --smoke      # seconds: tiny sizes, nothing written
    python benchmarks/coco_scale_bench.py --only cache # the synthetic file and the cache figures only
                                                       # (minutes); rewrites that section of the report
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _coco_file import CATEGORY_IDS, write_coco
from _memory import mapped_mb, peak_mb, pss_mb, rss_mb
from _publish import publish, publish_section

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks" / "coco_scale.md"


# --- measurements, each in its own process -------------------------------------------------------

def hold(images: str, annotations: str) -> None:
    """A process of the sharing measurement: build from the cache, read every page of the index,
    say so, and stay alive until stdin closes."""
    from rcnn_lab.data.coco import CocoDataset
    from rcnn_lab.data.coco_cache import ARRAYS

    start = time.perf_counter()
    ds = CocoDataset(images, annotations)
    built = time.perf_counter() - start
    touched = sum(int(np.asarray(getattr(ds.index, name)).reshape(-1).view(np.uint8)[::4096].sum()) for name in ARRAYS)
    print(json.dumps({"time_s": built, "touched": touched, "index_mb": ds.index.nbytes / 2**20}), flush=True)
    sys.stdin.readline()


def child(kind: str, images: str, annotations: str, options: dict) -> dict:
    if kind == "json":
        base, start = rss_mb(), time.perf_counter()
        with open(annotations, "rb") as f:
            json.load(f)
        return {"time_s": time.perf_counter() - start, "peak_mb": peak_mb(), "base_mb": base}
    if kind == "pycocotools":
        import contextlib
        import io

        from pycocotools.coco import COCO

        base, start = rss_mb(), time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(annotations)
        return {"time_s": time.perf_counter() - start, "peak_mb": peak_mb(), "base_mb": base}
    from rcnn_lab.data.coco import CocoDataset

    base, start = rss_mb(), time.perf_counter()
    ds = CocoDataset(images, annotations, progress=True)
    built = time.perf_counter() - start
    out = {"time_s": built, "peak_mb": peak_mb(), "base_mb": base, "index_mb": ds.index.nbytes / 2**20,
           "after_mb": rss_mb(), "images": len(ds), "annotations": ds.index.num_annotations}
    if kind in ("dataset", "cached"):
        return out
    if kind == "workers":
        return {**out, **workers(ds, options["workers"], options["items"], options["seed"])}
    return {**out, **evaluation(ds, options["dets"], options["seed"])}


def _one_thread(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def workers(ds, num_workers: int, items: int, seed: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from rcnn_lab.data.loader import collate

    gc.collect()
    sampler = RandomSampler(ds, replacement=True, num_samples=items, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(ds, batch_size=1, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                        worker_init_fn=_one_thread)
    it = iter(loader)
    pids = [w.pid for w in it._workers]
    first = min(100, items // 2)
    for _ in range(first):
        next(it)
    early = [pss_mb(os.getpid())] + [pss_mb(p) for p in pids]
    start = time.perf_counter()
    for _ in range(items - first):  # the last item: the workers stay alive until the next call
        next(it)
    elapsed = time.perf_counter() - start
    late = [pss_mb(os.getpid())] + [pss_mb(p) for p in pids]
    del it
    return {"first": first, "items": items, "early": early, "late": late,
            "items_per_s_per_worker": (items - first) / elapsed / num_workers}


def evaluation(ds, dets: int, seed: int) -> dict:
    from pycocotools import mask as mask_utils

    from rcnn_lab.engine.evaluate import coco_metrics

    start = time.perf_counter()
    gt = ds.coco()
    out = {"gt_coco_s": time.perf_counter() - start}
    rng = np.random.default_rng(seed)
    results = []
    for img in gt.dataset["images"]:
        h, w = img["height"], img["width"]
        anns = gt.imgToAnns.get(img["id"], [])
        polys, boxes, cats = [], [], []
        for j in range(dets):
            if anns and j < 3 * len(anns):
                a = anns[j % len(anns)]
                x, y, bw, bh = (v + rng.normal(0, 0.1 * s) for v, s in zip(a["bbox"], [a["bbox"][2], a["bbox"][3]] * 2))
                cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice(CATEGORY_IDS))
            else:
                bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
                x, y, cat = rng.uniform(0, w - bw), rng.uniform(0, h - bh), int(rng.choice(CATEGORY_IDS))
            x, y = min(max(x, 0.0), w - 2.0), min(max(y, 0.0), h - 2.0)
            bw, bh = min(max(bw, 1.0), w - x), min(max(bh, 1.0), h - y)
            boxes.append([x, y, bw, bh])
            polys.append([[x, y, x + bw, y, x + bw, y + bh, x + bw * 0.2, y + bh, x, y + bh * 0.8]])
            cats.append(cat)
        rles = mask_utils.frPyObjects([p[0] for p in polys], h, w)
        for box, rle, cat in zip(boxes, rles, cats):
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": img["id"], "category_id": cat, "bbox": box, "score": float(rng.random()),
                            "segmentation": rle})
    out["detections"] = len(results)
    for backend in ("pycocotools", "faster"):
        start = time.perf_counter()
        metrics, _ = coco_metrics(gt, results, ("bbox", "segm"), backend=backend)
        out[f"eval_{backend}_s"] = time.perf_counter() - start
        out[f"ap_{backend}"] = [metrics["bbox_AP"], metrics["segm_AP"]]
    return out


def child_env(cache: Path) -> dict:
    """A measured process's environment: this checkout first, one thread, the benchmark's own cache folder."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
            "RCNN_LAB_CACHE": str(cache)}


PHASE = re.compile(r"^rcnn-lab: coco [^:]+: (\w+) .*\((\d+\.\d) s\)$")


def measure(kind: str, images: Path, annotations: Path, cache: Path, **options) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(images), str(annotations), json.dumps(options)],
                          env=child_env(cache), capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise SystemExit(f"{kind} measurement failed (exit {done.returncode})")
    phases = {m[1]: float(m[2]) for m in map(PHASE.match, done.stderr.splitlines()) if m}  # the build's progress lines
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "phases": phases}


def shared(images: Path, annotations: Path, cache: Path, processes: int) -> dict:
    """``processes`` fresh processes build the dataset from the cache at once and hold it: per process, the
    RSS and PSS of the mapped index and the PSS of the whole process."""
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "hold", str(images), str(annotations), "{}"],
                              env=child_env(cache), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    try:
        ready = [json.loads(p.stdout.readline()) for p in procs]
        folder = str(cache.resolve())
        out = {"processes": processes, "build_s": [r["time_s"] for r in ready], "index_mb": ready[0]["index_mb"],
               "mapped": [mapped_mb(p.pid, folder) for p in procs], "pss": [pss_mb(p.pid)[0] for p in procs]}
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(60)
    if any(p.returncode for p in procs):
        raise SystemExit(f"sharing measurement failed (exits {[p.returncode for p in procs]})")
    return out


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


# --- the report ------------------------------------------------------------------------------

def report(args, sizes: dict, r: dict) -> str:
    js, pc, ds, wk, ev = r["json"], r["pycocotools"], r["dataset"], r["workers"], r["eval"]
    gb = 1024
    early, late = sum(p for p, _ in wk["early"]), sum(p for p, _ in wk["late"])
    early_w, late_w = sum(p for p, _ in wk["early"][1:]), sum(p for p, _ in wk["late"][1:])
    ratio = ds["time_s"] / pc["time_s"]

    def ok(flag: bool) -> str:
        return "met" if flag else "**not met**"

    lines = [
        "# COCO-size annotation files", "",
        f"`python benchmarks/coco_scale_bench.py{args.flags}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (other jobs running), Python {platform.python_version()}. A seeded synthetic file "
        f"of {sizes['images']:,} images and {sizes['instances']:,} instances (polygons, {args.crowd:.0%} crowd RLE), "
        f"{sizes['file_mb']:,.0f} MB of JSON, written in {sizes['write_s']:.0f} s. Each load runs in a fresh process; "
        "peak RSS is that process's maximum (`ru_maxrss`), including the interpreter and its imports "
        "(`before` is the RSS just before the load: the `CocoDataset` process has imported torch).", "",
        "| load | time | peak RSS | RSS before | peak - before |", "|---|---:|---:|---:|---:|",
        *[f"| {name} | {m['time_s']:.1f} s | {m['peak_mb'] / gb:.2f} GB | {m['base_mb']:,.0f} MB | {(m['peak_mb'] - m['base_mb']) / gb:.2f} GB |"
          for name, m in (("`json.load`", js), ("pycocotools `COCO(file)`", pc), ("`CocoDataset(images, file)`", ds),
                          ("the same, from the cache (fresh process)", r["cached"]))], "",
        "(`CocoDataset`'s first build includes storing its index in the on-disk cache; see *Cached index* below.)", "",
        f"After the build the dataset's index holds **{ds['index_mb']:,.0f} MB** in numpy buffers "
        f"({ds['images']:,} images, {ds['annotations']:,} annotations); the process's RSS is {ds['after_mb'] / gb:.2f} GB.", "",
        f"## DataLoader workers ({len(wk['early']) - 1} workers, random items)", "",
        f"| PSS (MB) | after {wk['first']} items | after {wk['items']:,} items |", "|---|---:|---:|",
        f"| main process | {wk['early'][0][0]:,.0f} | {wk['late'][0][0]:,.0f} |",
        *[f"| worker {i} (private) | {e[0]:,.0f} ({e[1]:,.0f}) | {lt[0]:,.0f} ({lt[1]:,.0f}) |"
          for i, (e, lt) in enumerate(zip(wk["early"][1:], wk["late"][1:]))],
        f"| workers | {early_w:,.0f} | {late_w:,.0f} |",
        f"| main + workers | {early:,.0f} | {late:,.0f} |", "",
        f"Items/s per worker: {wk['items_per_s_per_worker']:.1f} (decode a JPEG, build the masks; "
        f"{len(wk['early']) - 1} workers on {os.cpu_count()} cores).", "",
        "## Goals (ratios from this run)", "",
        "| goal | measured | |", "|---|---:|---|",
        f"| build <= 0.5x pycocotools' load | {ratio:.2f}x ({ds['time_s']:.1f} s / {pc['time_s']:.1f} s) | {ok(ratio <= 0.5)} |",
        f"| peak RSS <= pycocotools' | {ds['peak_mb'] / pc['peak_mb']:.2f}x (above the RSS before: "
        f"{(ds['peak_mb'] - ds['base_mb']) / (pc['peak_mb'] - pc['base_mb']):.2f}x) | {ok(ds['peak_mb'] <= pc['peak_mb'])} |",
        f"| index after build <= 1 GB | {ds['index_mb']:,.0f} MB | {ok(ds['index_mb'] <= 1024)} |",
        f"| worker PSS flat within 5 % | {late_w / early_w - 1:+.1%} (main + workers {late / early - 1:+.1%}) | "
        f"{ok(abs(late_w / early_w - 1) <= 0.05)} |", "",
        f"## Evaluation at val2017 size ({ev['images']:,} images, {ev['annotations']:,} instances, "
        f"{ev['detections']:,} detections)", "",
        "| step | time |", "|---|---:|",
        f"| ground truth: `CocoDataset` build | {ev['time_s']:.1f} s |",
        f"| ground truth: `coco()` (pycocotools index) | {ev['gt_coco_s']:.1f} s |",
        f"| bbox + segm evaluation, pycocotools | {ev['eval_pycocotools_s']:.1f} s |",
        f"| bbox + segm evaluation, faster-coco-eval | {ev['eval_faster_s']:.1f} s |", "",
        f"Both backends give bbox AP {ev['ap_pycocotools'][0]:.4f} / {ev['ap_faster'][0]:.4f} and segm AP "
        f"{ev['ap_pycocotools'][1]:.4f} / {ev['ap_faster'][1]:.4f} (pycocotools / faster-coco-eval) on these "
        f"synthetic detections; faster-coco-eval is {ev['eval_pycocotools_s'] / ev['eval_faster_s']:.1f}x faster.", "",
    ]
    return "\n".join(lines) + "\n" + cache_section(args, sizes, r)


def cache_section(args, sizes: dict, r: dict) -> str:
    """The ``## Cached index`` section: first vs cached build, and processes sharing the mapped entry."""
    cold, hot, sh = r["dataset"], r["cached"], r["shared"]
    n, gb = sh["processes"], 1024
    rss, pss = [m[0] for m in sh["mapped"]], [m[1] for m in sh["mapped"]]
    above_cold, above_hot = (max(0.0, m["peak_mb"] - m["base_mb"]) for m in (cold, hot))

    def ok(flag: bool) -> str:
        return "met" if flag else "**not met**"

    def row(name: str, m: dict, note: str = "") -> str:
        return (f"| {name} | {m['time_s']:.1f} s{note} | {m['peak_mb'] / gb:.2f} GB | {m['base_mb']:,.0f} MB | "
                f"{above_hot if m is hot else above_cold:,.0f} MB | {m['after_mb']:,.0f} MB |")

    lines = [
        "## Cached index", "",
        f"`python benchmarks/coco_scale_bench.py{args.flags}` on {os.cpu_count()} cores, load average {args.load:.1f} "
        "when it started" + (" (the machine was shared with other jobs: absolute times are inflated, compare ratios)"
                             if args.load > 0.5 else "") + f". The {sizes['file_mb']:,.0f} MB synthetic file ({sizes['images']:,} images, "
        f"{sizes['instances']:,} instances): the first `CocoDataset` build parses and checks it and stores the index "
        "in the on-disk cache (a temporary folder here); a second build in a fresh process maps the stored entry "
        "(`rcnn_lab.data.coco_cache`). Each build runs in its own process, which has imported torch (`RSS before`).", "",
        "| build | time | peak RSS | RSS before | peak - before | RSS after |", "|---|---:|---:|---:|---:|---:|",
        row("first: read, parse, check, store", cold, f" (store {cold['phases'].get('stored', float('nan')):.1f} s)"),
        row("second, fresh process: from the cache", hot), "",
        f"The entry holds {r['entry_mb']:,.0f} MB on disk (the index's {cold['index_mb']:,.0f} MB of arrays, one `.npy` "
        "file each, and a small `entry.json`). The cached build reads the image file names (to check the files exist) "
        "and maps the rest: its pages load as items are read, from the page cache that every process on the machine shares.", "",
        f"### {n} processes mapping the entry at once", "",
        f"{n} fresh processes built the dataset from the cache at the same time and then read every page of their index "
        "(a worst case: training reads it item by item). PSS splits each shared page among the processes mapping it.", "",
        "| | per process (mean) | all together |", "|---|---:|---:|",
        f"| build from the cache | {sum(sh['build_s']) / n:.1f} s | |",
        f"| index mapped: RSS | {sum(rss) / n:,.0f} MB | {sum(rss):,.0f} MB |",
        f"| index mapped: PSS | {sum(pss) / n:,.0f} MB | {sum(pss):,.0f} MB |",
        f"| whole process: PSS | {sum(sh['pss']) / n:,.0f} MB | {sum(sh['pss']):,.0f} MB |", "",
        f"Without the cache each of the {n} processes would parse the file ({cold['time_s']:.1f} s, "
        f"{above_cold / gb:.2f} GB above its baseline at the peak) and keep its own {cold['index_mb']:,.0f} MB index: "
        f"{n * cold['index_mb']:,.0f} MB in all, against {sum(pss):,.0f} MB of PSS for the shared one.", "",
        "| goal | measured | |", "|---|---:|---|",
        f"| cached build <= 0.05x the first build's time | {hot['time_s'] / cold['time_s']:.3f}x "
        f"({hot['time_s']:.1f} s / {cold['time_s']:.1f} s) | {ok(hot['time_s'] <= 0.05 * cold['time_s'])} |",
        f"| cached build's peak above its baseline <= 0.25x the first's | {above_hot / above_cold:.2f}x "
        f"({above_hot:,.0f} MB / {above_cold:,.0f} MB) | {ok(above_hot <= 0.25 * above_cold)} |",
        f"| {n} processes' mapped index PSS <= 1.1x one index | {sum(pss) / cold['index_mb']:.2f}x | "
        f"{ok(sum(pss) <= 1.1 * cold['index_mb'])} |", "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=118_287, help="train-size images (COCO train2017)")
    parser.add_argument("--instances", type=int, default=803_507, help="train-size instances")
    parser.add_argument("--val-images", type=int, default=5_000)
    parser.add_argument("--val-instances", type=int, default=36_781)
    parser.add_argument("--dets", type=int, default=100, help="detections per image in the evaluation")
    parser.add_argument("--crowd", type=float, default=0.01, help="fraction of crowd (RLE) instances")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every image/instance count")
    parser.add_argument("--items", type=int, default=20_000, help="random items the workers read")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--processes", type=int, default=4, help="processes mapping the cached index at once")
    parser.add_argument("--only", choices=["all", "cache"], default="all",
                        help="cache: the train-size file and the cache figures only; rewrites that section of the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); implies --no-write")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, images, annotations, options = args.child
        if kind == "hold":
            hold(images, annotations)
        else:
            print(json.dumps(child(kind, images, annotations, json.loads(options))))
        return
    args.load = os.getloadavg()[0]
    args.flags = "".join(f" {a}" for a in sys.argv[1:])
    if args.smoke:
        args.scale, args.items, args.dets, args.workers, args.processes, args.no_write = 0.002, 200, 10, 2, 2, True
    train = (max(4, round(args.images * args.scale)), max(4, round(args.instances * args.scale)))
    val = (max(4, round(args.val_images * args.scale)), max(4, round(args.val_instances * args.scale)))
    with tempfile.TemporaryDirectory(prefix="coco_scale_") as tmp:
        start = time.perf_counter()
        images, annotations = write_coco(Path(tmp) / "train", *train, args.crowd, args.seed)
        sizes = {"images": train[0], "instances": train[1], "write_s": time.perf_counter() - start,
                 "file_mb": annotations.stat().st_size / 2**20}
        print(f"wrote {annotations.stat().st_size / 2**20:,.0f} MB in {sizes['write_s']:.0f} s", file=sys.stderr)
        cache = Path(tmp) / "cache"  # the measured builds' cache: empty until the first CocoDataset build
        kinds = ("dataset", "cached") if args.only == "cache" else ("json", "pycocotools", "dataset", "cached")
        results = {kind: measure(kind, images, annotations, cache) for kind in kinds}
        results["shared"] = shared(images, annotations, cache, args.processes)
        results["entry_mb"] = folder_mb(cache)
        if args.only == "cache":
            publish_section(cache_section(args, sizes, results), REPORT, write=not args.no_write)
            return
        results["workers"] = measure("workers", images, annotations, cache, workers=args.workers, items=args.items,
                                     seed=args.seed)
        shutil.rmtree(Path(tmp) / "train")
        val_images, val_annotations = write_coco(Path(tmp) / "val", *val, args.crowd, args.seed + 1)
        results["eval"] = measure("eval", val_images, val_annotations, cache, dets=args.dets, seed=args.seed)
    publish(report(args, sizes, results), REPORT, write=not args.no_write)


if __name__ == "__main__":
    main()
