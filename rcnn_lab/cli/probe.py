"""``rcnn-lab probe``: which loss trains which component (gradient-flow table)."""

from __future__ import annotations

import argparse
import json


def add_arguments_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXP.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", help="only this variant")
    p.add_argument("--steps", type=int, default=1, help="training steps to probe and average over (default 1)")
    p.add_argument("--json", action="store_true")


def cmd_probe(args) -> int:
    from rcnn_lab.config.loader import load_experiment
    from rcnn_lab.errors import ConfigError, Problem
    from rcnn_lab.probe import probe

    if args.steps < 1:
        raise ConfigError([Problem("--steps", f"must be >= 1, got {args.steps}")])
    exp = load_experiment(args.experiment, args.overrides)
    variants = [exp.variant(args.variant)] if args.variant else exp.variants
    results = [{"name": v.name, "grad_norms": probe(v.config, args.steps)} for v in variants]
    if args.json:
        print(json.dumps({"experiment": exp.name, "steps": args.steps, "variants": results}, indent=2))
        return 0
    for r in results:
        norms = r["grad_norms"]
        comps = list(next(iter(norms.values())).keys())
        losses = list(norms)
        print(f"=== {r['name']}: gradient norm each loss sends into each component (mean of {args.steps} step(s))")
        head = [c.replace("roi_heads.", "").replace("backbone.", "bb.") for c in comps]
        width = max(12, *(len(h) for h in head)) + 1
        print(f"{'':<18}" + "".join(f"{h:>{width}}" for h in head))
        for loss in losses:
            print(f"{loss:<18}" + "".join(f"{_fmt(norms[loss][c]):>{width}}" for c in comps))
        print()
    return 0


def _fmt(v: float) -> str:
    return "0" if v == 0.0 else f"{v:.3e}"
