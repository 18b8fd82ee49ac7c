"""Every benchmark script still runs end to end (tiny sizes, nothing written); their figures live in docs/benchmarks/."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
def test_benchmark_script_runs(script, tmp_path):
    args, expected = CASES[script]
    write = [] if script == "roi_align_bench.py" else ["--no-write"]  # roi_align writes only with --out
    env = {**os.environ, "RCNN_LAB_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    before = sorted((ROOT / "docs" / "benchmarks").iterdir())
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, *write], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout, done.stdout[-2000:]
    assert sorted((ROOT / "docs" / "benchmarks").iterdir()) == before  # nothing written
