"""Every benchmark script still runs end to end (tiny sizes, nothing written); their figures live in docs/benchmarks/."""

from __future__ import annotations

import os
import runpy
import sys

import pytest
import torch

from tests.conftest import ROOT

CASES = {
    "train_step_bench.py": (["--iterations", "1", "--warmup", "1", "--overhead-steps", "2", "--threads", "1"],
                            "Ratio framework / plain:"),
    "optimizer_bench.py": (["--warmup", "0", "--repeats", "1"], "| AdamW |"),
    "data_bench.py": (["--smoke"], "training stream, batch 8"),
    "data_checks_bench.py": (["--smoke"], "`validate --data --deep`: every header read"),
    "coco_scale_bench.py": (["--smoke"], "| worker PSS flat within 5 % |"),
    "mlflow_overhead_bench.py": (["--steps", "1", "--rounds", "1"], "overhead"),
    "roi_align_bench.py": (["--rois", "8", "--image", "128", "--channels", "8", "--repeat", "1", "--warmup", "0",
                            "--no-memory", "--device", "cpu"], "forward+backward"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs(script, tmp_path, monkeypatch, capsys):
    """The script as ``python benchmarks/SCRIPT ARGS`` runs it, in this process: its imports are this worker's
    (an interpreter start of ~5 CPU s fewer per script); its environment and thread count are put back after."""
    args, expected = CASES[script]
    write = [] if script == "roi_align_bench.py" else ["--no-write"]  # roi_align writes only with --out
    before = sorted((ROOT / "docs" / "benchmarks").iterdir())
    environ = dict(os.environ)
    with monkeypatch.context() as mp:
        mp.setenv("RCNN_LAB_RUNS", str(tmp_path / "runs"))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(ROOT)
        mp.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling modules, as the script's own folder would be
        mp.setattr(sys, "argv", [str(ROOT / "benchmarks" / script), *args, *write])
        torch.set_num_threads(1)
        try:
            runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (None, 0), capsys.readouterr().err[-2000:]
        finally:  # what the script set in the environment stays with it
            os.environ.clear()
            os.environ.update(environ)
    out = capsys.readouterr().out
    assert expected in out, out[-2000:]
    assert sorted((ROOT / "docs" / "benchmarks").iterdir()) == before  # nothing written
