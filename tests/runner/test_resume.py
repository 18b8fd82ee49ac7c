"""Kill -9 and Ctrl-C a real ``rcnn-lab run`` mid-training; the rerun resumes into the same MLflow run and ends
with exactly the weights and metrics of an uninterrupted run (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rcnn_lab.engine import checkpoint as ckpt
from tests.conftest import ROOT
from tests.runner.conftest import cli, paused_env, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ITERATIONS = 4
CHECKPOINT_EVERY = 2
TRAIN = f"  checkpoint_every: {CHECKPOINT_EVERY}\n"
TIMING = ("train_time_s", "eval_time_s", "eval_images_per_s", "images_per_s", "peak_memory_mb")  # measured, not computed


def _experiment(folder: Path) -> Path:
    return tiny_experiment(folder, f"sqlite:///{folder / 'store' / 'mlflow.db'}", variants="  a: {}\n",
                           iterations=ITERATIONS, train=TRAIN, pausable=True)


def _start(warm, folder: Path):
    """``rcnn-lab run`` in a process of its own (forked warm: tests/warm.py), on one thread like this process, that
    stops after its first checkpoint until the test's signal (the reruns in this process do not stop)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RCNN_LAB_RUNS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    env = paused_env(env, CHECKPOINT_EVERY)
    return warm.popen([sys.executable, "-m", "rcnn_lab", "run", str(_experiment(folder)), "--no-progress"], cwd=folder, env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)


def _checkpoints(folder: Path) -> list[Path]:
    return [p for run in (folder / "store" / "outputs" / "tiny").glob("*") for p in ckpt.saved(ckpt.folder(run))]


def _interrupt_after_first_checkpoint(procs: dict) -> dict[Path, str]:
    """Send each process its signal as soon as its first checkpoint exists; -> output of each."""
    pending, deadline = dict(procs), time.time() + 240
    while pending and time.time() < deadline:
        for folder, (proc, sig) in list(pending.items()):
            if _checkpoints(folder) or proc.poll() is not None:
                proc.send_signal(sig)
                del pending[folder]
        time.sleep(0.05)
    outputs = {}
    for folder, (proc, _) in procs.items():
        outputs[folder] = proc.communicate(timeout=120)[0]
        first = ckpt.path_for(folder, CHECKPOINT_EVERY).name
        assert [p.name for p in _checkpoints(folder)] == [first], outputs[folder]  # stopped mid-run
    return outputs


def _state(folder: Path):
    """(the one child run, final weights, final metrics, loss per step) of the experiment in ``folder``."""
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{folder / 'store' / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name("tiny").experiment_id
    (run,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")
    weights = torch.load(_checkpoints(folder)[-1], map_location="cpu", weights_only=True)["model"]
    final = {k: v for k, v in run.data.metrics.items() if k.startswith("final/") and k[6:] not in TIMING}
    losses = {m.step: m.value for m in sorted(c.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp)}
    return run, weights, final, losses


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, new_store, warm):
    """Folders of a kill -9'd run, a Ctrl-C'd run, a SIGTERM'd run (a scheduler's time limit; all three then
    rerun) and an uninterrupted reference."""
    root = tmp_path_factory.mktemp("resume")
    killed, ctrl_c, sigterm, reference = root / "killed", root / "ctrl_c", root / "sigterm", root / "reference"
    for f in (killed, ctrl_c, sigterm, reference):
        new_store(f)
    procs = {killed: (_start(warm, killed), signal.SIGKILL), ctrl_c: (_start(warm, ctrl_c), signal.SIGINT),
             sigterm: (_start(warm, sigterm), signal.SIGTERM)}
    outputs = _interrupt_after_first_checkpoint(procs)
    codes = {f: procs[f][0].returncode for f in procs}
    before = {f: _state(f)[0] for f in procs}
    sweeps_before = {f: _sweeps(f) for f in procs}
    orphan = _checkpoints(killed)[0].with_name(".iter_0000004.pt.tmp-4194999")  # a write killed midway
    orphan.write_bytes(b"\0" * 1024)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RCNN_LAB_RUNS", raising=False)
        reruns = {}
        for f in (killed, ctrl_c, sigterm, reference):
            mp.chdir(f)
            reruns[f] = cli("run", str(_experiment(f)), "--no-progress")
    return dict(killed=killed, ctrl_c=ctrl_c, sigterm=sigterm, reference=reference, outputs=outputs, codes=codes, before=before,
                reruns=reruns, sweeps_before=sweeps_before, orphan=orphan)


def _sweeps(folder: Path) -> dict[str, str]:
    """Sweep (parent) runs of the experiment in ``folder``: run id -> status."""
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{folder / 'store' / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name("tiny").experiment_id
    return {r.info.run_id: r.info.status for r in c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'sweep'")}


def test_kill_9_leftovers_are_cleaned_by_the_rerun(interrupted):
    f = interrupted["killed"]
    (killed_sweep, status), = interrupted["sweeps_before"][f].items()
    assert status == "RUNNING"  # nothing could end it
    code, out, _ = interrupted["reruns"][f]
    sweeps = _sweeps(f)
    assert sweeps == {killed_sweep: "FINISHED"}  # the same command continued the killed sweep run: one sweep, not two
    assert f"continue sweep run {killed_sweep}" in out and "marked KILLED" not in out
    assert not interrupted["orphan"].exists()
    assert not list(_checkpoints(f)[0].parent.glob(".*.tmp-*"))


def test_resumed_run_logs_each_step_once(interrupted):
    from mlflow import MlflowClient

    for which in ("killed", "ctrl_c", "sigterm"):
        f = interrupted[which]
        run = _state(f)[0]
        c = MlflowClient(f"sqlite:///{f / 'store' / 'mlflow.db'}")
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, ITERATIONS + 1)), (which, steps)


def test_kill_9_leaves_a_running_run_that_the_rerun_resumes(interrupted):
    f = interrupted["killed"]
    assert interrupted["codes"][f] == -signal.SIGKILL
    assert interrupted["before"][f].info.status == "RUNNING"
    code, out, err = interrupted["reruns"][f]
    assert code == 0, err
    run = _state(f)[0]  # still exactly one child run for the config, now FINISHED
    assert run.info.run_id == interrupted["before"][f].info.run_id and run.info.status == "FINISHED"
    assert f"resume a seed=0 ({run.data.tags['rcnn_lab.config_hash']}) into run {run.info.run_id}" in out


@pytest.mark.parametrize("which", ["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_marks_the_run_killed_and_the_rerun_resumes(interrupted, which):
    f = interrupted[which]
    assert interrupted["codes"][f] == 130 and "interrupted" in interrupted["outputs"][f]
    assert interrupted["before"][f].info.status == "KILLED"
    code, out, err = interrupted["reruns"][f]
    assert code == 0, err
    run = _state(f)[0]
    assert run.info.run_id == interrupted["before"][f].info.run_id and run.info.status == "FINISHED"
    assert "resume a seed=0" in out
    (stopped, status), = interrupted["sweeps_before"][f].items()
    assert status == "KILLED" and _sweeps(f) == {stopped: "FINISHED"}  # its sweep run continued too, as the run did
    assert f"continue sweep run {stopped}" in out


@pytest.mark.parametrize("which", ["killed", "ctrl_c", "sigterm"])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(interrupted, which):
    _, weights, final, losses = _state(interrupted[which])
    ref_run, ref_weights, ref_final, ref_losses = _state(interrupted["reference"])
    assert ref_run.info.status == "FINISHED" and "final/bbox_AP" in ref_final and "final/segm_AP" in ref_final
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert final == ref_final
    assert losses == ref_losses and sorted(losses) == list(range(1, ITERATIONS + 1))
