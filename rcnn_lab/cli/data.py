"""``rcnn-lab export-shapes``: write a synthetic shapes split as an images folder + COCO JSON."""

from __future__ import annotations

import argparse


def add_arguments_export_shapes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (images/ and annotations.json); must be empty or new")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")


def cmd_export_shapes(args) -> int:
    from rcnn_lab._check import check_torchvision_ops
    from rcnn_lab.errors import ConfigError, Problem

    for flag, value in (("--num-images", args.num_images), ("--image-size", args.image_size)):
        if value < 1:
            raise ConfigError([Problem(flag, f"must be >= 1, got {value}")])
    check_torchvision_ops()
    from rcnn_lab.data.export import export_shapes

    path = export_shapes(args.out, split=args.split, num_images=args.num_images, image_size=args.image_size,
                         seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.num_images} {args.split} images and COCO annotations to {path}")
    return 0
