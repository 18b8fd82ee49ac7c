"""What commands print about a loaded experiment besides their own output: warnings and plugins."""

from __future__ import annotations

import sys


def print_warnings(exp, command: str, plugins: bool = True) -> None:
    """An experiment's warnings (valid but probably unintended settings), one stderr line each,
    and (``plugins``) the plugin files that were loaded, on stdout."""
    for w in exp.warnings:
        print(f"rcnn-lab {command}: warning: {w}", file=sys.stderr)
    if plugins and exp.plugin_files:
        print(f"plugins: {', '.join(exp.plugin_files)}")
