"""Time-boxed, fail-soft sections for a benchmark suite that must fit a fixed window of machine time.

Each :class:`Section` gets a budget in seconds: its function receives a :class:`Context` with the
``time.perf_counter()`` deadline to wind down by itself (stop timing loops early), and a hard alarm
(``SIGALRM``, main thread) a little after it interrupts a section that does not. A section appends
its markdown lines to ``ctx.lines`` as it goes and may call ``ctx.flush()`` to have the report
written with them; whatever it appended stays when it then fails. A section that raises or runs
out of time is recorded (status, error line) and the next one runs; ``on_update`` is called after
every section, so the report on disk is never more than one section behind.
"""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

GRACE_S = 10.0  # this long after its deadline, a section is interrupted


class SectionTimeout(BaseException):
    """Raised by the alarm in a section past its deadline (a BaseException: ``except Exception`` lets it through)."""


@dataclass
class Context:
    deadline: float  # time.perf_counter() value to wind down by
    lines: list[str]  # the section's markdown, appended as results come
    flush: Callable[[], None]  # write the report now (with the lines so far)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


@dataclass
class Section:
    name: str
    title: str
    budget_s: float  # planned seconds; later sections' budgets are reserved out of the total
    run: Callable[[Context], None]
    extend: bool = False  # may use time the earlier sections left unused (up to the total)


@dataclass
class Outcome:
    section: Section
    status: str = "not run"  # not run | running | ok | failed | timed out
    seconds: float = 0.0
    budget_s: float = 0.0
    lines: list[str] = field(default_factory=list)
    error: str = ""


def _alarm(signum, frame):
    raise SectionTimeout


def run_sections(sections: list[Section], total_s: float, on_update: Callable[[list[Outcome]], None] = lambda o: None,
                 after_each: Callable[[], None] = lambda: None, grace_s: float = GRACE_S) -> list[Outcome]:
    """Run ``sections`` in order within ``total_s`` seconds; returns one :class:`Outcome` per section.

    A section's budget is its planned ``budget_s`` (or, with ``extend``, everything left), never
    more than what the total leaves once the later sections' planned budgets are set aside.
    ``after_each`` runs after every section, failed or not (e.g. freeing GPU memory).
    """
    outcomes = [Outcome(s) for s in sections]
    end = time.perf_counter() + total_s
    on_update(outcomes)
    for i, (section, outcome) in enumerate(zip(sections, outcomes)):
        reserved = sum(s.budget_s for s in sections[i + 1:])
        left = end - time.perf_counter() - reserved
        outcome.budget_s = max(1.0, left if section.extend else min(section.budget_s, left))
        started = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, outcome.budget_s + grace_s)
        try:
            outcome.status = "running"
            section.run(Context(started + outcome.budget_s, outcome.lines, lambda: on_update(outcomes)))
            outcome.status = "ok"
        except SectionTimeout:
            outcome.status, outcome.error = "timed out", f"interrupted after {outcome.budget_s + grace_s:.0f} s"
        except Exception as exc:  # fail soft: record it, run the next section
            outcome.status = "failed"
            where = traceback.extract_tb(exc.__traceback__)[-1]
            outcome.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} " \
                            f"({where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
            traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            outcome.seconds = time.perf_counter() - started
        after_each()
        on_update(outcomes)
    return outcomes


def status_table(outcomes: list[Outcome]) -> list[str]:
    """Markdown: one row per section (status, seconds used of its budget, the error if any)."""
    rows = ["| section | status | seconds (budget) | error |", "|---|---|---:|---|"]
    for o in outcomes:
        used = f"{o.seconds:.0f} ({o.budget_s:.0f})" if o.status not in ("not run", "running") else f"- ({o.section.budget_s:.0f})"
        rows.append(f"| {o.section.title} | {o.status} | {used} | {o.error.replace('|', '/') or ''} |")
    return rows
