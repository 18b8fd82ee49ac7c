"""Flags of the other commands (inspect, report, ui, export-shapes) and stores, as the malformed-input corpus checks
experiments: exit 2 (3 for a store), one line naming the flag and the fix, no traceback, nothing written, bounded time."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from tests.cli.test_malformed_inputs import LINE_CAP, MEMORY_CAP_MB, OK, TIME_CAP_S, _invoke, _snapshot

LONG_TIME_S = 60.0  # commands that import torch or MLflow on first use (the corpus's cap is for the input's handling)


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Import what the commands import on first use, so the time cap measures the input's handling."""
    import mlflow  # noqa: F401

    import rcnn_lab.report  # noqa: F401
    from rcnn_lab.cli.main import build_parser

    build_parser()


@pytest.fixture(scope="module")
def not_mlflow():
    """An HTTP server that answers every request, but is not MLflow (a plain file server)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


CASES = [  # (id, argv, expected code, substrings of the error line); `afile` is a plain file, `exp.yaml` valid
    ("inspect-size-zero", ["inspect", "exp.yaml", "--image-size", "0", "0"], 2, ("--image-size", "1..100,000")),
    ("inspect-size-negative", ["inspect", "exp.yaml", "--image-size", "-64", "-64"], 2, ("--image-size", "-64 -64")),
    ("inspect-size-huge", ["inspect", "exp.yaml", "--image-size", "10", "10000000"], 2, ("--image-size",)),
    ("report-superscript-window", ["report", "exp.yaml", "--metric", "segm_AP@\u2075\u2070"], 2, ("--metric", "NAME@STEPS")),
    ("report-out-under-a-file", ["report", "exp.yaml", "--out", "afile/report.md"], 2, ("--out", "'afile' is a file")),
    ("report-out-folder-under-a-file", ["report", "exp.yaml", "--out", "afile/sub/deeper"], 2, ("--out", "afile")),
    ("export-out-under-a-file", ["export-shapes", "--out", "afile/shapes"], 2, ("--out", "'afile' is a file")),
    ("export-image-size-100gb", ["export-shapes", "--out", "new", "--image-size", "180000"], 2, ("--image-size", "4,096")),
    ("export-num-images-huge", ["export-shapes", "--out", "new", "--num-images", str(10**12)], 2, ("--num-images",)),
    ("export-image-size-zero", ["export-shapes", "--out", "new", "--image-size", "0"], 2, ("--image-size",)),
    ("ui-port-70000", ["ui", "--port", "70000"], 2, ("--port", "1..65535")),
    ("ui-port-zero", ["ui", "exp.yaml", "--port", "0"], 2, ("--port",)),
    ("ui-sqlite-memory", ["ui", "--uri", "sqlite:///:memory:"], 3, ("tracking store", "in-memory")),
    ("ui-ftp", ["ui", "--uri", "ftp://example.org/x"], 3, ("tracking store", "scheme 'ftp'")),
    ("report-sqlite-memory", ["report", "exp.yaml", "--uri", "sqlite://"], 3, ("tracking store", "in-memory")),
    ("report-plain-file-store", ["report", "exp.yaml", "--uri", "afile"], 3, ("tracking store", "is a file")),
    ("batch-100x-the-data", ["validate", "big_batch.yaml", "--data"], 2,
     ("big_batch.yaml: data.batch_size: is 500 but data.train has 4 images", "125x")),
    ("batch-100x-the-data-run", ["run", "big_batch.yaml", "--no-progress"], 2, ("data.batch_size", "use at most 4")),
]
BIG_BATCH = ("name: t\nmodel: {num_classes: 6}\ntrain: {device: cpu}\n"
             "data: {batch_size: 500, train: {type: shapes, num_images: 4}, val: {type: shapes, split: val, num_images: 2}}\n")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_flag_fails_in_one_line_and_writes_nothing(case, tmp_path, monkeypatch):
    _, argv, expected, expect = case
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "exp.yaml").write_text(OK)
    (folder / "afile").write_text("not a folder\n")
    (folder / "big_batch.yaml").write_text(BIG_BATCH)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RCNN_LAB_RUNS", raising=False)
    before = _snapshot(folder)

    code, out, err, elapsed, peak_mb = _invoke(argv)

    lines = err.splitlines()
    assert code == expected, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"rcnn-lab {argv[0]}: error: "), err[:2000]
    assert "Traceback" not in err
    assert all(line.startswith("plugins: ") for line in out.splitlines()), out  # found after loading (preflight) only
    assert out == "" or argv[1] == "big_batch.yaml"
    assert len(lines[0]) <= LINE_CAP, f"{len(lines[0])} characters: {lines[0][:300]}"
    for text in expect:
        assert text in lines[0], lines[0]
    assert _snapshot(folder) == before  # no store (ui creates none for a bad port), no report, no export
    assert elapsed < TIME_CAP_S and peak_mb < MEMORY_CAP_MB, (elapsed, peak_mb)


def test_a_server_that_is_not_mlflow_is_named_so_not_unreachable(not_mlflow, tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "exp.yaml").write_text(OK + f"tracking: {{uri: '{not_mlflow}'}}\n")
    monkeypatch.chdir(folder)
    before = _snapshot(folder)

    code, out, err, elapsed, _ = _invoke(["run", "exp.yaml", "--dry-run"])

    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 3 and len(lines) == 1 and "Traceback" not in err, err
    assert "answers, but not as an MLflow tracking server (HTTP 501" in lines[0], lines[0]
    assert "unreachable" not in lines[0] and "start it" not in lines[0]
    assert _snapshot(folder) == before and elapsed < LONG_TIME_S
    assert not Path("runs").exists()
