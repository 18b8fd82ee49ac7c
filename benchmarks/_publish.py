"""What a benchmark script does with its markdown report: print it, and write it under docs/benchmarks/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def publish(text: str, report: Path, write: bool = True) -> None:
    """Print ``text``; with ``write``, also save it to ``report`` (the figures the docs link to)."""
    print(text)
    if write:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
        print(f"wrote {report.relative_to(ROOT) if report.is_relative_to(ROOT) else report}")


def replace_section(document: str, section: str) -> str:
    """``document`` with the ``## `` section whose heading is ``section``'s first line replaced by
    ``section`` (up to the next ``## `` heading), or with ``section`` appended when it has none."""
    heading = section.splitlines()[0]
    lines = document.splitlines()
    if heading not in lines:
        return (document.rstrip("\n") + "\n\n" if document.strip() else "") + section.rstrip("\n") + "\n"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = ["", *lines[end:]] if end < len(lines) else []
    return "\n".join([*lines[:start], *section.rstrip("\n").splitlines(), *tail]) + "\n"


def publish_section(section: str, report: Path, write: bool = True) -> None:
    """Print one ``## `` section; with ``write``, put it into ``report`` in place of its earlier
    version (a part of a benchmark rerun alone, the rest of the report kept)."""
    print(section)
    if write:
        old = report.read_text() if report.is_file() else ""
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(replace_section(old, section))
        print(f"wrote {report.relative_to(ROOT) if report.is_relative_to(ROOT) else report} ({section.splitlines()[0]})")
