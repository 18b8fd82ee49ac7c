"""A seeded synthetic COCO file of any size (train2017's by default in coco_scale_bench.py).

Images of COCO's usual sizes (hard links to one JPEG per size), instances with polygons, a share of
crowd RLE, sparse unsorted image ids like COCO's, COCO's 80 category ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375)]  # (width, height), COCO's most common
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80


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
