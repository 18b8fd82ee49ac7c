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
