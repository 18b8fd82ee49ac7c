"""COCO-size annotation files: build time, peak memory, worker memory, evaluation time.

Writes a seeded synthetic COCO file of train2017's size itself (118,287 images of COCO's usual
sizes, 803,507 instances with polygons, 1 % crowd RLE; the images are hard links to one JPEG
per size) and measures, each in a fresh process so peak RSS is its own:

* ``json.load`` of the file, pycocotools ``COCO(file)`` and ``CocoDataset(images, file)``:
  wall time, peak RSS, and for the dataset the bytes its index holds after the build;
* a DataLoader with 4 workers over the dataset reading random items: the PSS of the main
  process and of the workers after 100 and after 20,000 items, and items/s per worker;
* at val2017's size (5,000 images, 36,781 instances, 100 detections per image): building the
  ground truth (``CocoDataset`` + ``coco()``) and one full bbox + segm evaluation with each
  backend (pycocotools and faster-coco-eval).

Run from the repository root::

    python benchmarks/coco_scale_bench.py              # full size (a few GB RAM, some minutes); writes docs/benchmarks/coco_scale.md
    python benchmarks/coco_scale_bench.py --scale 0.02 --no-write   # 2 % of every count
    python benchmarks/coco_scale_bench.py --smoke      # seconds: tiny sizes, nothing written
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _publish import publish

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks" / "coco_scale.md"
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375)]  # (width, height), COCO's most common
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80


# --- the synthetic file ----------------------------------------------------------------------

def write_coco(out: Path, num_images: int, num_instances: int, crowd: float, seed: int) -> tuple[Path, Path]:
    """Write ``out/images/*.jpg`` (hard links) and ``out/annotations.json``; return both paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = out / "images"
    images.mkdir(parents=True)
    sources = []
    for k, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w]
        sources.append(out / f"source_{k}.jpg")
        Image.fromarray(pixels).save(sources[-1], quality=90)
    ids = rng.choice(np.arange(1, 6 * num_images + 1), num_images, replace=False)  # sparse, unsorted like COCO's
    size_of = rng.integers(0, len(SIZES), num_images)
    owner = rng.integers(0, num_images, num_instances)  # ~6.8 instances per image on average at COCO's counts
    is_crowd = rng.random(num_instances) < crowd
    category = rng.choice(CATEGORY_IDS, num_instances)
    path = out / "annotations.json"
    with path.open("w") as f:
        f.write('{"info":{"description":"synthetic COCO-size file","version":"1.0"},"licenses":[{"id":1,"name":"x"}],')
        f.write('"images":[')
        for i in range(num_images):
            w, h = SIZES[size_of[i]]
            name = f"{ids[i]:012d}.jpg"
            os.link(sources[size_of[i]], images / name)
            f.write(("," if i else "") + f'{{"license":1,"file_name":"{name}","coco_url":"http://images.example/{name}",'
                    f'"height":{h},"width":{w},"date_captured":"2013-11-14 17:02:52","id":{ids[i]}}}')
        f.write('],"annotations":[')
        for chunk in range(0, num_instances, 50_000):
            k = np.arange(chunk, min(chunk + 50_000, num_instances))
            wh = np.array(SIZES, np.float64)[size_of[owner[k]]]
            w, h = wh[:, 0], wh[:, 1]
            bw = np.clip(rng.lognormal(np.log(w / 6), 0.8), 4, w)
            bh = np.clip(rng.lognormal(np.log(h / 6), 0.8), 4, h)
            x, y = rng.uniform(0, 1, len(k)) * (w - bw), rng.uniform(0, 1, len(k)) * (h - bh)
            vertices = rng.integers(8, 32, len(k))
            angle = np.where(np.arange(32) < vertices[:, None], rng.uniform(0, 2 * np.pi, (len(k), 32)), np.inf)
            angle = np.sort(angle, 1)
            radius = rng.uniform(0.7, 1.0, (len(k), 32))
            px = np.round(x[:, None] + bw[:, None] / 2 * (1 + radius * np.cos(np.where(np.isinf(angle), 0, angle))), 2)
            py = np.round(y[:, None] + bh[:, None] / 2 * (1 + radius * np.sin(np.where(np.isinf(angle), 0, angle))), 2)
            for j, i in enumerate(k.tolist()):
                n, W, H = int(vertices[j]), int(w[j]), int(h[j])
                if is_crowd[i]:
                    x0, y0, x1, y1 = int(x[j]), int(y[j]), int(x[j] + bw[j]), int(y[j] + bh[j])
                    col = [y0, y1 - y0, H - y1]
                    counts = [x0 * H + col[0]] + [col[1], col[2] + col[0]] * (x1 - x0 - 1) + [col[1], col[2] + (W - x1) * H]
                    seg = f'{{"counts":{json.dumps(counts, separators=(",", ":"))},"size":[{H},{W}]}}'
                    box, area = [x0, y0, x1 - x0, y1 - y0], float((x1 - x0) * (y1 - y0))
                else:
                    qx, qy = px[j, :n], py[j, :n]
                    seg = "[[" + ",".join(map("{:.2f}".format, np.stack([qx, qy], 1).ravel().tolist())) + "]]"
                    x0, y0 = qx.min(), qy.min()
                    box = [x0, y0, qx.max() - x0, qy.max() - y0]
                    area = 0.5 * abs(float(np.dot(qx, np.roll(qy, 1)) - np.dot(qy, np.roll(qx, 1))))
                f.write(("," if i else "") + f'{{"segmentation":{seg},"area":{area:.4f},"iscrowd":{int(is_crowd[i])},'
                        f'"image_id":{ids[owner[i]]},"bbox":[{",".join(f"{v:.2f}" for v in box)}],'
                        f'"category_id":{category[i]},"id":{i + 1}}}')
        f.write('],"categories":[' + ",".join(f'{{"supercategory":"thing","id":{c},"name":"class{c}"}}'
                                              for c in CATEGORY_IDS) + "]}")
    for source in sources:
        source.unlink()
    return images, path


# --- measurements, each in its own process -------------------------------------------------------

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pss_mb(pid: int) -> tuple[float, float]:
    """(PSS, private) of process ``pid`` in MB, from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


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
    if kind == "dataset":
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


def measure(kind: str, images: Path, annotations: Path, **options) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(images), str(annotations), json.dumps(options)],
                          env=env, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise SystemExit(f"{kind} measurement failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
          for name, m in (("`json.load`", js), ("pycocotools `COCO(file)`", pc), ("`CocoDataset(images, file)`", ds))], "",
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); implies --no-write")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, images, annotations, options = args.child
        print(json.dumps(child(kind, images, annotations, json.loads(options))))
        return
    args.flags = "".join(f" {a}" for a in sys.argv[1:])
    if args.smoke:
        args.scale, args.items, args.dets, args.workers, args.no_write = 0.002, 200, 10, 2, True
    train = (max(4, round(args.images * args.scale)), max(4, round(args.instances * args.scale)))
    val = (max(4, round(args.val_images * args.scale)), max(4, round(args.val_instances * args.scale)))
    with tempfile.TemporaryDirectory(prefix="coco_scale_") as tmp:
        start = time.perf_counter()
        images, annotations = write_coco(Path(tmp) / "train", *train, args.crowd, args.seed)
        sizes = {"images": train[0], "instances": train[1], "write_s": time.perf_counter() - start,
                 "file_mb": annotations.stat().st_size / 2**20}
        print(f"wrote {annotations.stat().st_size / 2**20:,.0f} MB in {sizes['write_s']:.0f} s", file=sys.stderr)
        results = {kind: measure(kind, images, annotations) for kind in ("json", "pycocotools", "dataset")}
        results["workers"] = measure("workers", images, annotations, workers=args.workers, items=args.items, seed=args.seed)
        shutil.rmtree(Path(tmp) / "train")
        val_images, val_annotations = write_coco(Path(tmp) / "val", *val, args.crowd, args.seed + 1)
        results["eval"] = measure("eval", val_images, val_annotations, dets=args.dets, seed=args.seed)
    publish(report(args, sizes, results), REPORT, write=not args.no_write)


if __name__ == "__main__":
    main()
