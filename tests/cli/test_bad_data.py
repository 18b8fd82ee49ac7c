"""The bad-data corpus (tests/data/bad_data.py) through ``validate --data``, ``--deep`` and ``run``.

Every case must end the same way: exit 2, exactly one error line on stderr naming the file, the
entry and the fix, no traceback, nothing on stdout, no file created or changed (no cache entry, no
lock file, no MLflow store), in bounded time and traced memory. The cases that crashed or exhausted
memory before the checks existed run again in a child process whose address space is capped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from rcnn_lab.cli.main import main
from tests.conftest import ROOT
from tests.data.bad_data import CASES, write_case

TIME_CAP_S = 20.0  # guards against exhaustion, not speed goals (the model is built on the meta device too)
MEMORY_CAP_MB = 200  # traced Python memory; the child process below caps the whole address space
LINE_CAP = 400


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_bad_input_is_one_line_before_anything_is_written(case, tmp_path, monkeypatch):
    folder = tmp_path / case.id
    exp = write_case(folder, case)
    cache = tmp_path / "cache"
    monkeypatch.setenv("RCNN_LAB_CACHE", str(cache))
    monkeypatch.chdir(folder)
    before = _snapshot(folder)
    tracemalloc.start()
    started = time.perf_counter()
    code, out, err = _call(["validate", "exp.yaml", "--data"] + (["--deep"] if case.deep else []))
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    lines = err.strip().splitlines()
    assert code == 2 and all(o.startswith("plugins: ") for o in out.splitlines()), (code, out, err)  # the project's registry/
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"rcnn-lab validate: error: {case.file}: "), line
    assert all(e in line for e in case.expect), line
    assert "Traceback" not in err and len(line) <= LINE_CAP, line
    assert elapsed < TIME_CAP_S and peak < MEMORY_CAP_MB, (elapsed, peak)
    assert _snapshot(folder) == before  # nothing created or changed beside the inputs
    cached = sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []
    if case.file == "annotations.json" and not case.indexed:  # a refused JSON file leaves nothing: no entry, no lock file, no folder
        assert cached == [], cached
    else:  # a sound JSON file's index may be cached (the next build maps it), with its lock file; nothing else
        assert all(n.startswith("coco-index") and "/.tmp-" not in n and (not n.endswith(".lock") or n[:-5] in cached)
                   for n in cached), cached
    assert exp.exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("nan-polygon", "corrupt-image", "empty-after-filtering")],
                         ids=lambda c: c.id)
def test_run_refuses_them_before_a_store_or_run_exists(case, tmp_path, monkeypatch):
    folder = tmp_path / case.id
    write_case(folder, case)
    monkeypatch.setenv("RCNN_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(folder)
    before = _snapshot(folder)
    code, out, err = _call(["run", "exp.yaml"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and case.expect[0] in err, err
    assert _snapshot(folder) == before and not (folder / "runs").exists()


def test_deep_checks_every_header_and_remembers_them(tmp_path, monkeypatch):
    from tests.data.bad_data import Case

    folder = tmp_path / "ok"
    write_case(folder, Case("sound"))
    monkeypatch.setenv("RCNN_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(folder)
    code, out, err = _call(["validate", "exp.yaml", "--data", "--deep"])
    assert code == 0 and "data.train: read 2 image headers" in out and "every image header read" in out, (out, err)
    code, out, _ = _call(["validate", "exp.yaml", "--data", "--deep"])
    assert code == 0 and "data.train: read 0 image headers" in out and "2 more unchanged" in out
    code, _, err = _call(["validate", "exp.yaml", "--deep"])
    assert code == 2 and "--deep: checks the datasets' image files; add --data" in err


_CHILD = """
import contextlib, io, json, os, resource, sys
from rcnn_lab.cli.main import main
import torch, torchvision, pycocotools.mask  # imported before the cap: the cap is for the checks
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main(["components"])  # the registries and the model code loaded too
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
cap = vm + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
results = {}
for folder in sys.argv[2:]:
    os.chdir(folder)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["validate", "exp.yaml", "--data"])
    results[folder] = [code, err.getvalue()]
print(json.dumps(results))
"""


def test_the_cases_that_crashed_stay_within_a_memory_cap(tmp_path):
    """Under an address-space cap of 1 GB above a loaded process, each former crasher is one line, exit 2."""
    crashers = [c for c in CASES if c.crash]
    folders = []
    for case in crashers:
        write_case(tmp_path / case.id, case)
        folders.append(str(tmp_path / case.id))
    env = {**os.environ, "RCNN_LAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, "1024", *folders], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, folder in zip(crashers, folders):
        code, err = results[folder]
        assert code == 2 and len(err.strip().splitlines()) == 1 and case.expect[0] in err, (case.id, err)
