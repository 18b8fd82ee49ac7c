"""benchmarks/pytest_cputime.py: CPU seconds per test, its own and its waited-for subprocesses', as TSV."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TESTS = """
import subprocess, sys, time

def test_busy():
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass

def test_child():
    subprocess.run([sys.executable, "-c", "import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass"], check=True)

def test_idle():
    time.sleep(0.3)

def test_forked_elsewhere():  # a process the test waited for that another process reaped (tests/warm.py)
    import pytest_cputime
    pytest_cputime.add_children_cpu(0.5)
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_each_test_gets_its_own_and_its_childrens_cpu_seconds(tmp_path, workers):
    (tmp_path / "test_sample.py").write_text(TESTS)
    out = tmp_path / "cpu.tsv"
    env = {**os.environ, "CPUTIME_OUT": str(out), "PYTHONPATH": str(ROOT / "benchmarks")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_cputime", "-p", "no:randomly",
                           "-p", "no:cacheprovider", *workers, "test_sample.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = out.read_text().splitlines()
    rows = {line.split("\t")[0]: [float(x) for x in line.split("\t")[1:]] for line in lines}
    names = ["test_sample.py::test_busy", "test_sample.py::test_child", "test_sample.py::test_idle",
             "test_sample.py::test_forked_elsewhere"]
    # serially in the order they ran; under xdist each once, from both workers (written by the controller)
    assert (list(rows) if not workers else sorted(rows)) == (names if not workers else sorted(names)) and len(lines) == 4
    own, children, wall = rows["test_sample.py::test_busy"]
    assert own >= 0.29 and children == 0.0 and wall >= own - 0.05
    own, children, wall = rows["test_sample.py::test_child"]
    assert children >= 0.29 and own < children
    own, children, wall = rows["test_sample.py::test_idle"]
    assert own < 0.2 and children == 0.0 and wall >= 0.29
    assert rows["test_sample.py::test_forked_elsewhere"][1] == 0.5
