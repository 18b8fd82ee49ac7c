"""``rcnn-lab`` entry point: the table of sub-commands, and one place that turns errors into exit codes.

Parsing arguments imports no torch: command modules import it inside their handlers, and the
check that torch and torchvision match runs where the built-in components are first needed
(``rcnn_lab.components.register_builtins``), so ``--help`` and errors in the YAML answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rcnn_lab._check import BrokenInstallError
from rcnn_lab._version import __version__
from rcnn_lab.cli import components, data, inspect, predict, probe, report, run, search
from rcnn_lab.cli import eval as eval_
from rcnn_lab.errors import RcnnLabError


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, one-line help, how it adds its arguments, and what runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: tuple[Command, ...] = (
    Command("components", "list every registered component and its parameters",
            components.add_arguments_components, components.cmd_components),
    Command("validate", "load every variant of an experiment and build its model",
            inspect.add_arguments_validate, inspect.cmd_validate),
    Command("inspect", "resolved config, parameters per component and anchors of a variant",
            inspect.add_arguments_inspect, inspect.cmd_inspect),
    Command("run", "train and evaluate every variant x seed, tracked in MLflow", run.add_arguments_run, run.cmd_run),
    Command("search", "hyperparameter search over config keys (search: in the experiment), seed-aware",
            search.add_arguments_search, search.cmd_search),
    Command("eval", "evaluate weights (a file, torchvision's, a run's last checkpoint) on data.val, tracked in MLflow",
            eval_.add_arguments_eval, eval_.cmd_eval),
    Command("probe", "gradient norm each loss sends into each component", probe.add_arguments_probe, probe.cmd_probe),
    Command("predict", "draw a trained detector's detections on image files; one COCO-results file",
            predict.add_arguments_predict, predict.cmd_predict),
    Command("report", "aggregate finished runs into tables and plots", report.add_arguments_report, report.cmd_report),
    Command("ui", "start the MLflow UI on the experiment store", run.add_arguments_ui, run.cmd_ui),
    Command("export-shapes", "write a synthetic shapes split in COCO format",
            data.add_arguments_export_shapes, data.cmd_export_shapes),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rcnn-lab", description="Mask R-CNN experiments and ablations.")
    parser.add_argument("--version", action="version", version=f"rcnn-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `run --nproc/--parallel` relaunch this command line
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader that has gone (`| head`) shows here, not as an error at exit
        return code
    except BrokenInstallError as exc:  # the install, not the command: one line before anything ran
        print(f"rcnn-lab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RcnnLabError as exc:
        for line in str(exc).splitlines():
            print(f"rcnn-lab {args.command}: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rcnn-lab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rcnn-lab run EXP --dry-run | head`: the reader has gone, which is not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
