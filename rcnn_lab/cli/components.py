"""``rcnn-lab components``: every family, its names, parameters with defaults, first doc line."""

from __future__ import annotations

import argparse
import inspect
import json

from rcnn_lab.config.types import type_name


def add_arguments_components(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--family", help="only this family")
    p.add_argument("--plugins", metavar="EXP.yaml", help="also load the plugins this experiment uses")


def describe() -> dict:
    from rcnn_lab.registry import FAMILIES

    out = {}
    for family, reg in FAMILIES.items():
        entries = []
        for name in reg.names():
            e = reg.get(name)
            params = [
                {"name": p.name, "type": type_name(p.annotation), "required": p.required,
                 **({} if p.required else {"default": _plain(p.default)})}
                for p in e.params()
            ]
            entries.append({"name": name, "summary": e.summary, "source": e.source, "params": params,
                            "injected": list(e.inject), **({"meta": e.meta} if e.meta else {})})
        out[family] = {"doc": reg.doc, "components": entries}
    return out


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v if v is not inspect.Parameter.empty else None


def cmd_components(args) -> int:
    from rcnn_lab.components import register_builtins
    from rcnn_lab.plugins import load_plugins

    register_builtins()  # before the plugins, so that a plugin reusing a built-in name is reported
    if args.plugins:
        from rcnn_lab.engine.preflight import load_experiment

        loaded = load_experiment(args.plugins, check_models=False).plugin_files
    else:
        loaded = load_plugins()
    data = describe()
    if args.family:
        from rcnn_lab.errors import ConfigError, did_you_mean

        if args.family not in data:
            raise ConfigError(f"unknown family {args.family!r}{did_you_mean(args.family, data)} (families: {', '.join(data)})", "--family")
        data = {args.family: data[args.family]}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"plugins: {', '.join(loaded) or '(none)'}\n")
    for family, info in data.items():
        print(f"{family}  ({info['doc']})")
        for e in info["components"]:
            print(f"  {e['name']:<26}{e['summary']}")
            for p in e["params"]:
                default = "required" if p["required"] else f"= {json.dumps(p['default'], default=str)}"
                print(f"      {p['name']}: {p['type']} {default}")
            if e["injected"]:
                print(f"      (set by the builder: {', '.join(e['injected'])})")
        print()
    return 0
