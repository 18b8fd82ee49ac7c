"""``rcnn-lab eval``: evaluate given weights on every variant's ``data.val`` (or one's), tracked in MLflow."""

from __future__ import annotations

import argparse
import sys

from rcnn_lab.errors import ConfigError, Problem


def add_arguments_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXP.yaml")
    p.add_argument("--weights", metavar="W", help="a .pth state_dict, an rcnn-lab checkpoint, a torchvision weights name "
                   "(MaskRCNN_ResNet50_FPN_Weights.COCO_V1, coco) or run:RUN_ID")
    p.add_argument("--run", metavar="RUN_ID", help="a finished run of the store: its last checkpoint")
    p.add_argument("--variant", help="evaluate only these variants (comma-separated names; default: every variant)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to every variant (repeatable), e.g. data.val.annotations=...")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (sets train.device)")
    p.add_argument("--force", action="store_true", help="evaluate again when a finished evaluation of the same "
                   "config and weights exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_eval(args) -> int:
    check_flags(args.weights, args.run)  # before the YAML and without torch: nothing to load for a wrong command line
    from rcnn_lab.engine.preflight import load_experiment

    flags = {"--device": ("train.device", args.device)} if args.device else None
    exp = load_experiment(args.experiment, args.overrides, flags=flags)
    only = [s.strip() for s in args.variant.split(",") if s.strip()] if args.variant else None
    # torch and MLflow from here on: the experiment is valid
    from rcnn_lab.cli.notes import print_warnings
    from rcnn_lab.cli.run import print_summary
    from rcnn_lab.engine.preflight import prepare_eval
    from rcnn_lab.runner import tracking as tr
    from rcnn_lab.runner.evaluate_only import check_fit, evaluate_plan, make_eval_plan, read_weights
    from rcnn_lab.runner.outcome import Status
    from rcnn_lab.runner.plan import resolved

    print_warnings(exp, "eval")
    _check_variants(exp, only)
    with_masks = all(v.config.model.roi_heads.mask_head is not None for v in exp.variants if not only or v.name in only)
    weights = read_weights(args.weights, args.run, tr.resolve_uri(exp.tracking.uri), with_masks=with_masks)
    plan = make_eval_plan(exp, only, weights)
    inputs = prepare_eval(plan)  # devices and validation sets, before any run exists
    plan = resolved(plan, inputs)  # model.num_classes: auto -> 1 + data.val's categories
    check_fit(plan, weights)  # every variant's model takes all its tensors from the weights
    outcomes = evaluate_plan(exp, plan, weights, inputs, force=args.force,
                             progress=not args.no_progress and sys.stderr.isatty())
    print_summary(outcomes)
    if any(o.unstored for o in outcomes):
        return 3  # evaluated, but the tracking store stopped answering: the last lines said how to store the rest
    return 1 if any(o.status == Status.FAILED for o in outcomes) else 0


def check_flags(weights: str | None, run_id: str | None) -> None:
    """Exactly one of ``--weights`` and ``--run`` (before anything is loaded)."""
    if weights is not None and run_id is not None:
        raise ConfigError([Problem("--weights", "and --run both given; evaluate one: --weights FILE|NAME or --run RUN_ID")])
    if weights is None and run_id is None:
        raise ConfigError([Problem("--weights", "missing: give --weights FILE|NAME (a .pth state_dict, an rcnn-lab "
                                   "checkpoint, MaskRCNN_ResNet50_FPN_Weights.COCO_V1, coco) or --run RUN_ID (a "
                                   "finished run's last checkpoint)")])
    for flag, value in (("--weights", weights), ("--run", run_id)):
        if value is not None and not value.strip():
            raise ConfigError([Problem(flag, "is empty; give a value")])


def _check_variants(exp, only: list[str] | None) -> None:
    """--variant names that the experiment has (``make_plan`` names --only in its errors)."""
    from rcnn_lab.errors import did_you_mean

    names = [v.name for v in exp.variants]
    problems = [Problem("--variant", f"no variant {n!r}{did_you_mean(n, names)} (variants: {', '.join(names)})")
                for n in only or [] if n not in names]
    if problems:
        raise ConfigError(problems)
