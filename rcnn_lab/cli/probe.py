"""``rcnn-lab probe``: which loss trains which component (gradient-flow table)."""

from __future__ import annotations

import argparse
import json


def add_arguments_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXP.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted.key=value), repeatable")
    p.add_argument("--variant", help="only this variant (default: every variant)")
    p.add_argument("--steps", type=int, default=1,
                   help="batches to probe, training on each between probes; norms are averaged (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON: variants[].name, variants[].grad_norms[LOSS][COMPONENT]")


def cmd_probe(args) -> int:
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.errors import ConfigError, Problem

    if args.steps < 1:
        raise ConfigError([Problem("--steps", f"must be >= 1, got {args.steps}")])
    exp = load_experiment(args.experiment, args.overrides)
    from rcnn_lab.probe import probe  # torch: only once the experiment is valid

    variants = [exp.variant(args.variant)] if args.variant else exp.variants
    results = []
    for v in variants:
        results.append({"name": v.name, "grad_norms": probe(v.config, args.steps)})
        if not args.json:
            print(format_table(results[-1]["name"], results[-1]["grad_norms"], args.steps), flush=True)
    if args.json:
        print(json.dumps({"experiment": exp.name, "steps": args.steps, "variants": results}, indent=2))
    return 0


def format_table(name: str, norms: dict[str, dict[str, float]], steps: int) -> str:
    """One row per component, one column per loss; an exact 0 is printed as ``0``."""
    losses = list(norms)
    comps = list(next(iter(norms.values())))
    width = max(13, *(len(loss) + 1 for loss in losses))
    first = max(len(c) for c in comps) + 2
    lines = [f"=== {name}: gradient norm each loss (column) sends into each component (row), "
             f"mean of {steps} batch(es)",
             f"{'component':<{first}}" + "".join(f"{loss:>{width}}" for loss in losses)]
    lines += [f"{c:<{first}}" + "".join(f"{_fmt(norms[loss][c]):>{width}}" for loss in losses) for c in comps]
    return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return "0" if v == 0.0 else f"{v:.3e}"
