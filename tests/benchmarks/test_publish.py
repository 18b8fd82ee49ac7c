"""benchmarks/_publish.py: a part of a benchmark rerun alone replaces its own section of the report."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def _publish():
    spec = importlib.util.spec_from_file_location("_publish", ROOT / "benchmarks" / "_publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DOC = "# Report\n\nintro\n\n## A\n\nold a\n\n### A.1\n\nold a.1\n\n## B\n\nb\n"


def test_a_section_replaces_its_earlier_version_up_to_the_next_section():
    replace = _publish().replace_section
    assert replace(DOC, "## A\n\nnew a\n") == "# Report\n\nintro\n\n## A\n\nnew a\n\n## B\n\nb\n"
    assert replace(DOC, "## B\n\nnew b") == "# Report\n\nintro\n\n## A\n\nold a\n\n### A.1\n\nold a.1\n\n## B\n\nnew b\n"
    assert replace(DOC, "## C\n\nc\n") == DOC + "\n## C\n\nc\n"
    assert replace("", "## C\n\nc") == "## C\n\nc\n"


def test_publish_section_writes_only_with_write(tmp_path, capsys):
    publish_section = _publish().publish_section
    report = tmp_path / "r.md"
    report.write_text(DOC)
    publish_section("## B\n\nnew b\n", report, write=False)
    assert report.read_text() == DOC and "new b" in capsys.readouterr().out
    publish_section("## B\n\nnew b\n", report)
    assert report.read_text().endswith("## B\n\nnew b\n") and "old a.1" in report.read_text()
