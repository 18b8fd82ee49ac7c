"""A pytest plugin: CPU seconds per test (this process, and the subprocesses it waited for), as TSV.

On a shared machine wall times (``--durations``) follow the other work on the cores; CPU seconds
follow the test's own work more closely (docs/benchmarks/test_suite.md). Usage::

    CPUTIME_OUT=cpu.tsv PYTHONPATH=benchmarks python -m pytest tests/test_probe.py -p pytest_cputime

Columns: test id, CPU s of the pytest process, CPU s of its waited-for children (with the processes that
tests/warm.py forked for it, reported through :func:`add_children_cpu`), wall s (setup, call and teardown
together, module fixtures included where the test set them up).

Under pytest-xdist (``-n 2``, as ``make test`` runs) each worker hands its rows to the controlling
process (xdist's ``workeroutput``), which writes them all, a worker's rows in the order it ran them.
"""

from __future__ import annotations

import os
import time

import pytest

_rows: list[tuple[str, float, float, float]] = []
_elsewhere = [0.0]  # CPU s of processes a test waited for that were not its children (tests/warm.py's forks)


def add_children_cpu(seconds: float) -> None:
    """Count ``seconds`` as the running test's children's: a process it waited for that another process reaped."""
    _elsewhere[0] += seconds


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before, wall, elsewhere = os.times(), time.perf_counter(), _elsewhere[0]
    yield
    after = os.times()
    own = (after.user - before.user) + (after.system - before.system)
    children = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    children += _elsewhere[0] - elsewhere
    _rows.append((item.nodeid, own, children, time.perf_counter() - wall))


_joined: list[str] = []  # pytest-xdist's controller: the rows of the workers that ended


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _joined.extend(getattr(node, "workeroutput", {}).get("cputime_rows", []))


def pytest_sessionfinish(session):
    out = os.environ.get("CPUTIME_OUT")
    if not out:
        return
    lines = [f"{name}\t{own:.2f}\t{children:.2f}\t{wall:.2f}\n" for name, own, children, wall in _rows]
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller writes the file
        workeroutput["cputime_rows"] = lines
        return
    with open(out, "w") as f:
        f.writelines(lines + _joined)
