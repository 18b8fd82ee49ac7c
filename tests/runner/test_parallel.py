"""``rcnn-lab run --parallel K`` and the command lines ``--nproc`` / ``--parallel`` relaunch."""

from __future__ import annotations

import os
import sys

import pytest

from rcnn_lab.runner import parallel
from rcnn_lab.runner import tracking as tr
from tests.runner.conftest import cli, files_under, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_relaunched_command_lines_drop_the_launch_flag():
    argv = ["run", "e.yaml", "--nproc", "2", "--no-progress", "--set", "a=1", "--np=4", "--parallel", "3"]
    assert parallel.strip_option(argv, "--nproc") == ["run", "e.yaml", "--no-progress", "--set", "a=1", "--parallel", "3"]
    assert parallel.strip_option(argv, "--parallel") == argv[:-2]
    cmd = parallel.torchrun_command(2, argv)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("-m", 3):][:3] == ["-m", "rcnn_lab", "run"]
    assert "--nproc" not in cmd and "--np=4" not in cmd


def test_workers_share_the_cpu_cores(monkeypatch):
    monkeypatch.setattr(parallel, "_cores", lambda: 8)
    env = parallel.worker_env(1, 3, cuda=False)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert parallel.worker_env(0, 16, cuda=False)["OMP_NUM_THREADS"] == "1"


def test_bad_scale_flags_fail_before_anything_is_written(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    exp = tiny_experiment(tmp_path, uri)
    before = files_under(tmp_path)
    for flags, message in [(["--nproc", "2", "--parallel", "2"], "--parallel: cannot be combined with --nproc"),
                           (["--parallel", "2", "--shard", "0/2"], "--parallel: cannot be combined with --shard"),
                           (["--nproc", "0"], "--nproc: must be >= 1"),
                           (["--nproc", "4"], "data.batch_size: 2 images per global batch cannot be split over 4")]:
        code, _, err = cli("run", str(exp), *flags)
        assert code == 2 and message in err, err
    assert files_under(tmp_path) == before


@pytest.mark.slow
def test_parallel_2_trains_both_variants_and_summarises(tmp_path):
    import subprocess

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    variants = "  a: {}\n  bad: {train.optimizer.lr: 1.0e+12}\n"
    exp = tiny_experiment(tmp_path, uri, variants=variants, name="par")
    done = subprocess.run([sys.executable, "-m", "rcnn_lab", "run", str(exp), "--parallel", "2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "2"})
    out = done.stdout
    assert done.returncode == 1, out + done.stderr  # one variant failed
    lines = out.splitlines()
    assert any(line.startswith("[a seed=0] run    a seed=0") for line in lines), out
    assert any(line.startswith("[bad seed=0] FAILED bad seed=0: TrainingError: non-finite loss") for line in lines), out
    summary = lines[lines.index(next(line for line in lines if line.startswith("variant"))):]
    assert [line.split()[:3] for line in summary[1:]] == [["a", "0", "FINISHED"], ["bad", "0", "FAILED"]], out
    assert sum(line.startswith("variant") for line in lines) == 1  # the workers print no tables of their own

    c = tr.client(uri)
    runs = c.search_runs([c.get_experiment_by_name("par").experiment_id], filter_string="tags.`rcnn_lab.kind` = 'variant'")
    assert sorted((r.data.tags["rcnn_lab.variant"], r.info.status) for r in runs) == [("a", "FINISHED"), ("bad", "FAILED")]
    assert len({r.data.tags["rcnn_lab.pid"] for r in runs}) == 2  # two worker processes
