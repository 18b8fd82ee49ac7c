"""``rcnn-lab export-shapes``: write a synthetic shapes split as an images folder + COCO JSON."""

from __future__ import annotations

import argparse

from rcnn_lab.data.limits import MAX_IMAGE_SIZE, MAX_IMAGES


def add_arguments_export_shapes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (images/ and annotations.json); must be empty or new")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--num-images", type=int, default=64, help=f"1..{MAX_IMAGES:,} (default 64)")
    p.add_argument("--image-size", type=int, default=128, help=f"side in pixels, 8..{MAX_IMAGE_SIZE:,} (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")


def cmd_export_shapes(args) -> int:
    from rcnn_lab._check import check_torchvision_ops
    from rcnn_lab.cli.paths import check_writable, write_failed
    from rcnn_lab.errors import ConfigError, Problem

    for flag, value, low, high in (("--num-images", args.num_images, 1, MAX_IMAGES),
                                   ("--image-size", args.image_size, 8, MAX_IMAGE_SIZE)):
        if not low <= value <= high:  # bounded: one image is held in memory, all of them land on disk
            raise ConfigError([Problem(flag, f"must be {low}..{high:,}, got {value}")])
    if not 0 <= args.seed < 2**63:
        raise ConfigError([Problem("--seed", f"must be 0..2**63-1, got {args.seed}")])
    check_writable(args.out, "--out")
    check_torchvision_ops()
    from rcnn_lab.data.export import export_shapes

    try:
        path = export_shapes(args.out, split=args.split, num_images=args.num_images, image_size=args.image_size,
                             seed=args.seed, overwrite=args.overwrite)
    except OSError as exc:  # the export is atomic: nothing is left behind
        raise write_failed(exc, args.out, "--out") from None
    print(f"wrote {args.num_images} {args.split} images and COCO annotations to {path}")
    return 0
