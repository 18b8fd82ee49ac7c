"""``rcnn-lab predict``: a trained detector on image files; drawn pictures and one COCO-results file, no MLflow run.

Every input is checked before anything is written (the flags, the experiment, the images, ``--out``,
the weights and that they fit the variant's model, the device, the categories); ``--out`` is
created only then. The work itself is ``rcnn_lab.engine.predict``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXP.yaml", help="the experiment the weights were trained with")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files and folders (searched recursively)")
    p.add_argument("--weights", metavar="W", help="a .pth state_dict, an rcnn-lab checkpoint, a torchvision weights name "
                   "(MaskRCNN_ResNet50_FPN_Weights.COCO_V1, coco) or run:RUN_ID")
    p.add_argument("--run", metavar="RUN_ID", help="a finished run of the store: its last checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for images/<name>.png and results.json")
    p.add_argument("--score", type=float, default=0.5, help="keep detections with at least this score (default 0.5)")
    p.add_argument("--variant", help="the variant whose model the weights fit (needed when the experiment has several)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override (repeatable), e.g. eval.batch_size=8")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (sets train.device)")
    p.add_argument("--no-draw", action="store_true", help="write results.json only, no pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _variant(exp, name: str | None):
    from rcnn_lab.errors import ConfigError, Problem

    if name is not None:
        return exp.variant(name)
    if len(exp.variants) == 1:
        return exp.variants[0]
    names = ", ".join(v.name for v in exp.variants[:10]) + (", ..." if len(exp.variants) > 10 else "")
    raise ConfigError([Problem("--variant", f"missing: {exp.name} has {len(exp.variants)} variants ({names}); "
                                            "name the one the weights were trained with")])


def _check_score(score: float) -> None:
    import math

    from rcnn_lab.errors import ConfigError, Problem

    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise ConfigError([Problem("--score", f"must be a score in [0, 1], got {score}; e.g. --score 0.5")])


def cmd_predict(args) -> int:
    from rcnn_lab.cli.eval import check_flags
    from rcnn_lab.engine.preflight import load_experiment

    check_flags(args.weights, args.run)  # before the YAML and without torch: nothing to load for a wrong command line
    _check_score(args.score)
    flags = {"--device": ("train.device", args.device)} if args.device else None
    exp = load_experiment(args.experiment, args.overrides, flags=flags)
    variant = _variant(exp, args.variant)
    # torch from here on: the command line and the experiment are valid
    from rcnn_lab.cli.notes import print_warnings
    from rcnn_lab.engine.predict import check_out, find_images, predict_images

    out = check_out(args.out)
    items = find_images(args.images, exclude=out)
    from rcnn_lab.runner import tracking as tr
    from rcnn_lab.runner.evaluate_only import read_weights

    print_warnings(exp, "predict")
    cfg = variant.config
    device, categories, cfg = _inputs(cfg, variant)
    weights = read_weights(args.weights, args.run, tr.resolve_uri(exp.tracking.uri),
                           with_masks=cfg.model.roi_heads.mask_head is not None)
    model, summary = _model(cfg, weights, variant, categories)
    print(summary, flush=True)
    from rcnn_lab.engine.evaluator import place  # on the device in the run's memory format, as eval
    from rcnn_lab.engine.trainer import resolve_amp

    done = predict_images(place(model, cfg, device), items, out, categories, device, batch_size=cfg.eval.batch_size,
                          num_workers=cfg.data.num_workers, score=args.score, amp_dtype=resolve_amp(cfg.train.amp, device),
                          draw=not args.no_draw, progress=not args.no_progress and sys.stderr.isatty() and len(items) > 1)
    from rcnn_lab.errors import display_path

    pictures = "" if args.no_draw else f"pictures in {display_path(out / 'images')}, "
    print(f"{done.images} image(s), {done.detections} detection(s) with score >= {args.score:g} in {done.wall_s:.1f} s "
          f"({done.images_per_s:.2f} images/s on {device}); {pictures}results in {display_path(done.results)}")
    if done.failed:
        print(f"rcnn-lab predict: error: {len(done.failed)} of {len(items)} image(s) could not be read (listed above); "
              "replace or remove them", file=sys.stderr)
        return 2
    return 0


def _inputs(cfg, variant):
    """The device (``train.device``), the category names (``data.val``'s categories) and ``cfg`` with
    ``model.num_classes: auto`` counted from them; one-line errors."""
    from dataclasses import replace

    from rcnn_lab.components import register_builtins
    from rcnn_lab.engine.device import resolve_device
    from rcnn_lab.engine.preflight import auto_num_classes
    from rcnn_lab.errors import ConfigError, Problem
    from rcnn_lab.registry import DATASETS

    register_builtins()
    problems, device, categories = [], None, None
    try:
        device = resolve_device(cfg.train.device)
    except ConfigError as exc:
        problems += exc.problems
    try:
        val_set = DATASETS.build(cfg.data.val, "data.val")
        categories = val_set.categories
        if cfg.model.num_classes == "auto":  # the model the weights were trained as: 1 + the categories
            cfg = replace(cfg, model=replace(cfg.model, num_classes=auto_num_classes(val_set, "data.val")))
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError([p if p.file else Problem(p.path, p.message, variant.source_of(p.path)) for p in problems])
    return device, categories, cfg


def _model(cfg, weights, variant, categories):
    """The variant's model with every tensor from ``weights``: ``(model, one-line load summary)``.

    torchvision's COCO weights have their class rows by COCO category id: reordered to the labels of
    ``categories`` first, as the trainer and ``rcnn-lab eval`` do (``engine.weights.load``).
    """
    from rcnn_lab.engine.weights import load, whole
    from rcnn_lab.errors import ConfigError, Problem
    from rcnn_lab.models.builder import build_for_weights

    model = build_for_weights(cfg.model)  # the backbone's own weights are not read: every tensor is replaced
    report = load(model, weights.state, source=weights.source, identity=weights.identity, categories=categories,
                  key=weights.flag)
    # every tensor of the model from the file, and none of the file left over inside a part the model has
    # (ResNet-34 weights fill a ResNet-18 by name and shape, with blocks to spare: another architecture all the same)
    if not whole(model, report):
        raise ConfigError([Problem(weights.flag, f"{weights.source} does not fit variant {variant.name}'s model "
                                   f"({report.summary()}); predictions need the model the weights were trained as: give the "
                                   "experiment (and --variant) they were trained with, or set model.num_classes and "
                                   "the architecture to theirs", variant.file or None)])
    return model, f"{report.source}: {report.summary()}"
