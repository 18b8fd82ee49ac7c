"""``rcnn-lab validate`` and ``rcnn-lab inspect``."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from rcnn_lab.config.schema import AUTO
from rcnn_lab.config.types import to_plain
from rcnn_lab.engine.preflight import load_experiment

MAX_IMAGE_SIDE = 100_000  # inspect --image-size: anchors are counted on the meta device, any size is cheap


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXP.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. model.rpn.pre_nms_top_n.train=1000 (repeatable)")


def add_arguments_validate(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--data", action="store_true",
                   help="also open every dataset and check the device, as run does before training")
    p.add_argument("--deep", action="store_true",
                   help="with --data: read every image file's header (size, pixel limit, corrupt files), with a "
                        "progress bar; files that passed before are remembered in the cache")


def add_arguments_inspect(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--variant", help="only this variant")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help=f"input image size for the anchor count, 1..{MAX_IMAGE_SIDE:,} pixels "
                        "(default: the model's min_size, square)")
    p.add_argument("--json", action="store_true")


def meta_model(model_cfg):
    """The variant's model on the meta device: shapes and counts without memory or downloads
    (``models.builder.meta_config``: num_classes auto stood in, the built-in backbones with their weights)."""
    import torch

    from rcnn_lab.models.builder import build_model, meta_config

    with torch.device("meta"):
        return build_model(meta_config(model_cfg))


def _model_key(model_cfg) -> str:
    return json.dumps(to_plain(model_cfg), sort_keys=True, default=str)


def cmd_validate(args) -> int:
    counts: dict[str, int] = {}  # model config -> parameters, counted on the models the load built to check them

    def count(config, model) -> None:
        from rcnn_lab.models.builder import count_parameters

        counts[_model_key(config.model)] = count_parameters(model)

    exp = load_experiment(args.experiment, args.overrides, on_model=count)
    from rcnn_lab.cli.notes import print_warnings
    from rcnn_lab.models.builder import count_parameters  # torch: only once the experiment is valid

    print_warnings(exp, "validate")
    if args.deep and not args.data:
        from rcnn_lab.errors import ConfigError, Problem

        raise ConfigError([Problem("--deep", "checks the datasets' image files; add --data")])
    if args.data:
        from rcnn_lab.engine.preflight import preflight
        from rcnn_lab.runner.plan import make_plan

        plan = make_plan(exp)
        inputs = preflight(plan)
        counted = {r.variant.name: inputs[r.hash].num_classes for r in plan if inputs[r.hash].num_classes}
        if args.deep:
            check_image_headers(inputs)
    else:
        counted = {}
    rows = []
    for v in exp.variants:
        model_cfg = v.config.model
        if v.name in counted:  # model.num_classes: auto, counted from the data
            model_cfg = replace(model_cfg, num_classes=counted[v.name])
        params = counts.get(_model_key(model_cfg))
        if params is None:  # num_classes counted from the data (validate --data): another model
            params = count_parameters(meta_model(model_cfg))
        changed = ", ".join(f"{k}={json.dumps(val)}" for k, val in v.changed.items()) or "(base)"
        rows.append((v.name + (" *" if v.baseline else ""), f"{params:,}", changed))
    w0 = max(len("variant"), *(len(r[0]) for r in rows))
    w1 = max(len("parameters"), *(len(r[1]) for r in rows))
    print(f"{'variant':<{w0}}  {'parameters':>{w1}}  changed keys vs base")
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}")
    auto = [v.name for v in exp.variants if v.config.model.num_classes == AUTO]
    if auto:
        print(auto_note(auto, counted))
    print(f"\n{exp.path}: {len(exp.variants)} variant(s) x {len(exp.seeds)} seed(s) valid (* = baseline)")
    if args.data:
        print("datasets opened and device checked: run's preflight passes"
              + ("; every image header read" if args.deep else " (image headers: a sample; --deep reads all)"))
    else:
        print("not checked: dataset files and device availability (validate --data checks them); "
              "the tracking store is checked by run only")
    return 0


def auto_note(names: list[str], counted: dict[str, int]) -> str:
    """What ``model.num_classes: auto`` resolves to for the variants ``names`` (``counted``: by the data, when read)."""
    from rcnn_lab.models.builder import AUTO_STAND_IN

    done = sorted({counted[n] for n in names if n in counted})
    if done and len(done) == 1 and all(n in counted for n in names):
        return (f"model.num_classes: auto -> {done[0]} (1 + data.train's {done[0] - 1} categories) "
                f"for {', '.join(names)}")
    if counted:
        return "model.num_classes: auto -> " + ", ".join(f"{n}: {counted[n]}" for n in names if n in counted)
    return (f"model.num_classes: auto -> 1 + data.train's categories, counted when the data is read (run, eval, "
            f"predict; validate --data shows the number); parameters above count predictors for {AUTO_STAND_IN} "
            "classes meanwhile" + (f" ({', '.join(names)})" if names else ""))


def check_image_headers(inputs: dict) -> None:
    """``validate --data --deep``: every image header of every dataset that can check them (``check_images``)."""
    import sys

    from rcnn_lab.errors import ConfigError, Problem

    seen, problems = set(), []
    for run_inputs in inputs.values():
        for key, dataset in (("train", run_inputs.train_set), ("val", run_inputs.val_set)):
            if id(dataset) in seen or not hasattr(dataset, "check_images"):
                continue
            seen.add(id(dataset))
            try:
                done = dataset.check_images(progress=sys.stderr.isatty())
            except ConfigError as exc:
                problems += [Problem(f"data.{key}.{p.path}" if p.path else f"data.{key}", p.message, p.file)
                             for p in exc.problems]
                continue
            print(f"data.{key}: read {done.images - done.cached:,} image headers in {done.seconds:.1f} s "
                  f"({done.rate:,.0f}/s), {done.cached:,} more unchanged since an earlier check (cache)")
    if problems:
        raise ConfigError(problems)


def anchor_report(model, image_size: tuple[int, int] | None) -> dict:
    """Cell anchors per level (rounded as torchvision does), feature-map sizes and anchor counts."""
    import torch

    t = model.transform
    if image_size is None:
        image_size = (int(t.min_size[-1]), int(t.min_size[-1]))
    h, w = image_size
    scale = min(float(t.min_size[-1]) / min(h, w), float(t.max_size) / max(h, w))
    rh, rw = int(h * scale), int(w * scale)  # interpolate(scale_factor=...) floors
    div = t.size_divisible
    ph, pw = -(-rh // div) * div, -(-rw // div) * div
    with torch.no_grad():
        features = model.backbone(torch.empty(1, 3, ph, pw, device="meta"))
    ag = model.rpn.anchor_generator
    cell = [ag.generate_anchors(s, a).tolist() for s, a in zip(ag.sizes, ag.aspect_ratios)]
    levels = []
    for (name, f), anchors in zip(features.items(), cell):
        fh, fw = int(f.shape[-2]), int(f.shape[-1])
        levels.append({"name": name, "feature_size": [fh, fw], "stride": [ph // fh, pw // fw],
                       "anchors_per_location": len(anchors), "anchors": fh * fw * len(anchors)})
    return {
        "image_size": [h, w], "resized": [rh, rw], "padded": [ph, pw],
        "cell_anchors": cell, "per_level": levels, "total": sum(lv["anchors"] for lv in levels),
    }


def check_image_size(size: list[int] | None) -> None:
    """``--image-size H W``: positive and bounded (the anchors of a 0 or negative image are meaningless)."""
    from rcnn_lab.errors import ConfigError, Problem

    if size is not None and not all(1 <= s <= MAX_IMAGE_SIDE for s in size):
        raise ConfigError([Problem("--image-size", f"H and W must be 1..{MAX_IMAGE_SIDE:,} pixels, got {size[0]} {size[1]}")])


def cmd_inspect(args) -> int:
    check_image_size(args.image_size)
    exp = load_experiment(args.experiment, args.overrides)
    from rcnn_lab.cli.notes import print_warnings
    from rcnn_lab.models.builder import count_parameters, parameter_groups  # torch: only once the experiment is valid

    print_warnings(exp, "inspect", plugins=not args.json)
    variants = [exp.variant(args.variant)] if args.variant else exp.variants
    out = []
    for v in variants:
        model = meta_model(v.config.model)
        out.append({
            "name": v.name, "baseline": v.baseline, "changed": v.changed, "config": to_plain(v.config),
            "parameters": count_parameters(model), "components": parameter_groups(model),
            "anchors": anchor_report(model, tuple(args.image_size) if args.image_size else None),
        })
    if args.json:
        print(json.dumps({"experiment": exp.name, "variants": out}, indent=2, default=str))
        return 0
    import yaml

    for v in out:
        print(f"=== variant {v['name']}{' (baseline)' if v['baseline'] else ''}")
        print(yaml.safe_dump(v["config"], sort_keys=False).rstrip())
        print(f"\nparameters: {v['parameters']:,}")
        if v["config"]["model"]["num_classes"] == AUTO:
            print(f"  ({auto_note([], {})})")
        for name, n in v["components"].items():
            print(f"  {name:<26}{n:>12,}")
        a = v["anchors"]
        print(f"\nanchors for a {a['image_size'][0]}x{a['image_size'][1]} image "
              f"(resized {a['resized'][0]}x{a['resized'][1]}, padded {a['padded'][0]}x{a['padded'][1]}):")
        for lv, cell in zip(a["per_level"], a["cell_anchors"]):
            fh, fw = lv["feature_size"]
            stride = f"({lv['stride'][0]}, {lv['stride'][1]})"  # (h, w), as torchvision's AnchorGenerator
            print(f"  level {lv['name']:<5} {fh:>4}x{fw:<4} stride {stride:<9}  "
                  f"{lv['anchors_per_location']} x {fh * fw:>6} = {lv['anchors']:>7}  cell {cell}")
        print(f"  total anchors: {a['total']:,}\n")
    return 0
