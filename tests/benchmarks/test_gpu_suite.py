"""benchmarks/gpu_suite.py: its --smoke mode runs every section on the CPU, and never passes for GPU figures."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_smoke_runs_every_section_and_labels_itself(tmp_path, monkeypatch, capfd):
    """``python benchmarks/gpu_suite.py --smoke`` in this process (one interpreter start fewer); its quickstart
    section's ``rcnn-lab run`` is a process of its own, as on a GPU machine."""
    monkeypatch.setenv("RCNN_LAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu_suite = importlib.import_module("gpu_suite")
    out = tmp_path / "gpu.md"
    before = sorted((ROOT / "docs" / "benchmarks").iterdir())
    code = gpu_suite.main(["--smoke", "--out", str(out)])
    assert code == 0, "".join(capfd.readouterr())[-6000:]
    text = out.read_text()
    assert "CPU smoke run: these are not GPU figures" in text and "No GPU run has been made yet" in text
    statuses = re.findall(r"^\| (.+?) \| (ok|failed|timed out|not run|running) \|", text, re.M)
    assert len(statuses) == 5 and all(s == "ok" for _, s in statuses), statuses
    train = text.split("## Training")[1].split("## Inference")[0]
    rows = [line for line in train.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split(" | ")[0] for r in rows] == ["| fp32", "| bf16", "| bf16, box-gradient path"]
    assert rows[0].split(" | ")[1] == "off (float32)" and all("failed" not in r for r in rows)
    quick = text.split("## Quickstart")[1]
    assert "| FINISHED |" in quick  # the run reached MLflow's store and finished
    assert sorted((ROOT / "docs" / "benchmarks").iterdir()) == before  # --out only


def test_smoke_refuses_to_overwrite_gpu_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # main() in this process: the refusal comes before any work
    gpu_suite = importlib.import_module("gpu_suite")
    out = tmp_path / "gpu.md"
    out.write_text(f"{gpu_suite.FULL_RUN_MARK}\n# GPU benchmark suite\nfigures\n")
    assert gpu_suite.main(["--smoke", "--out", str(out)]) == 2
    assert "holds a GPU run" in capsys.readouterr().err
    assert out.read_text().endswith("figures\n")
