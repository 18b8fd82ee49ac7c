"""benchmarks/_suite.py: sections are time-boxed, fail soft, and report as they go."""

from __future__ import annotations

import importlib.util
import sys
import time

from tests.conftest import ROOT


def _suite():
    spec = importlib.util.spec_from_file_location("_suite", ROOT / "benchmarks" / "_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_failing_and_a_stalling_section_are_recorded_and_the_rest_still_runs():
    s = _suite()
    ran, reports = [], []

    def ok(ctx):
        ctx.lines.append("first figures")
        ran.append("ok")

    def fails(ctx):
        ctx.lines.append("partial figures")
        raise ValueError("out of memory\nsecond line")

    def stalls(ctx):  # ignores its deadline: the alarm must stop it
        ctx.lines.append("before the stall")
        while True:
            time.sleep(0.01)

    def last(ctx):
        ran.append("last")
        ctx.lines.append(f"{ctx.left():.0f} s left")

    sections = [s.Section("a", "A", 5, ok), s.Section("b", "B", 5, fails), s.Section("c", "C", 0.2, stalls),
                s.Section("d", "D", 5, last)]
    started = time.perf_counter()
    outcomes = s.run_sections(sections, 60, on_update=lambda o: reports.append([x.status for x in o]), grace_s=0.3)
    assert time.perf_counter() - started < 10
    assert [o.status for o in outcomes] == ["ok", "failed", "timed out", "ok"]
    assert ran == ["ok", "last"]
    assert outcomes[1].lines == ["partial figures"] and outcomes[1].error.startswith("ValueError: out of memory (")
    assert outcomes[2].lines == ["before the stall"] and "interrupted" in outcomes[2].error
    assert reports[0] == ["not run"] * 4 and reports[-1] == ["ok", "failed", "timed out", "ok"]
    assert len(reports) == 5  # before the first section and after each one
    table = "\n".join(s.status_table(outcomes))
    assert "| B | failed |" in table and "| C | timed out |" in table


def test_budgets_leave_room_for_the_later_sections():
    s = _suite()
    seen = {}

    def record(name):
        return lambda ctx: seen.setdefault(name, ctx.left())

    sections = [s.Section("a", "A", 100, record("a")), s.Section("b", "B", 30, record("b")),
                s.Section("c", "C", 20, record("c"), extend=True)]
    outcomes = s.run_sections(sections, 80)
    assert [round(o.budget_s) for o in outcomes][:2] == [30, 30]  # a: 80 - (30 + 20) reserved for b and c
    assert 79 < outcomes[2].budget_s <= 80  # c extends to all that a and b left unused (they took no time)
    assert seen["a"] <= 30 and seen["c"] > 79
