"""``rcnn-lab`` entry point: sub-commands, and one place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys

from rcnn_lab import __version__
from rcnn_lab.errors import RcnnLabError

COMMANDS = {
    "components": ("rcnn_lab.cli.components", "list every registered component and its parameters"),
    "validate": ("rcnn_lab.cli.inspect", "load every variant of an experiment and build its model"),
    "inspect": ("rcnn_lab.cli.inspect", "resolved config, parameters per component and anchors of a variant"),
    "run": ("rcnn_lab.cli.run", "train and evaluate every variant x seed, tracked in MLflow"),
    "probe": ("rcnn_lab.cli.probe", "gradient norm each loss sends into each component"),
    "report": ("rcnn_lab.cli.report", "aggregate finished runs into tables and plots"),
    "ui": ("rcnn_lab.cli.run", "start the MLflow UI on the experiment store"),
    "export-shapes": ("rcnn_lab.cli.data", "write a synthetic shapes split in COCO format"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="rcnn-lab", description="Mask R-CNN experiments and ablations.")
    parser.add_argument("--version", action="version", version=f"rcnn-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        getattr(mod, "add_arguments_" + name.replace("-", "_"))(p)
        p.set_defaults(handler=getattr(mod, "cmd_" + name.replace("-", "_")))
    return parser


def main(argv: list[str] | None = None) -> int:
    from rcnn_lab._check import check_torchvision_ops

    try:  # before anything imports torchvision: a mismatched build fails at import
        check_torchvision_ops()
    except RcnnLabError as exc:
        print(f"rcnn-lab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `run --nproc/--parallel` relaunch this command line
    try:
        return int(args.handler(args) or 0)
    except RcnnLabError as exc:
        for line in str(exc).splitlines():
            print(f"rcnn-lab {args.command}: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rcnn-lab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
