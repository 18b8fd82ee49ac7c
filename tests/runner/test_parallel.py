"""``rcnn-lab run --parallel K`` and the command lines ``--nproc`` / ``--parallel`` relaunch."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from rcnn_lab.runner import launch, parallel
from rcnn_lab.runner import tracking as tr
from tests.runner.conftest import cli, files_under, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_relaunched_command_lines_drop_the_launch_flag():
    argv = ["run", "e.yaml", "--nproc", "2", "--no-progress", "--set", "a=1", "--np=4", "--parallel", "3"]
    assert parallel.strip_option(argv, "--nproc") == ["run", "e.yaml", "--no-progress", "--set", "a=1", "--parallel", "3"]
    assert parallel.strip_option(argv, "--parallel") == argv[:-2]
    assert launch.rank_command(argv) == [sys.executable, "-m", "rcnn_lab", "run", "e.yaml", "--no-progress", "--set", "a=1",
                                         "--parallel", "3"]


def test_a_rank_is_interrupted_once_and_ignores_later_signals():
    """Ctrl-C reaches a rank from the terminal and from its launcher: the second must not cut short
    the recording of the run as KILLED."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            parallel._interrupt(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_workers_share_the_cpu_cores(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 8)
    env = parallel.worker_env(1, 3, cuda=False)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert parallel.worker_env(0, 16, cuda=False)["OMP_NUM_THREADS"] == "1"


def test_a_worker_ends_with_its_coordinator_and_a_sweep_stops_on_sigterm_as_on_ctrl_c(monkeypatch):
    from rcnn_lab.runner.lifeline import LAUNCHER_PID_VAR

    # the coordinator names itself the workers' launcher: die_with_launcher() asks for SIGTERM at its death
    assert parallel.worker_env(0, 2, cuda=False)[LAUNCHER_PID_VAR] == str(os.getpid())
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.delenv(parallel.SWEEP_ENV, raising=False)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        sigint = signal.getsignal(signal.SIGINT)
        parallel.join("cpu")  # a sweep outside DDP (plain, --parallel worker): SIGTERM interrupts as Ctrl-C does
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is sigint  # Ctrl-C itself is left as it was
        for _ in range(2):  # every SIGTERM interrupts (a second one cuts a slow recording short, as Ctrl-C)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


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
def test_parallel_2_trains_both_variants_and_summarises(tmp_path, new_store, monkeypatch):
    uri = new_store(tmp_path)  # an empty store copied, not built by MLflow's migrations (seconds of fsync)
    variants = "  a: {}\n  bad: {train.optimizer.lr: 1.0e+12}\n"
    exp = tiny_experiment(tmp_path, uri, variants=variants, name="par")
    monkeypatch.chdir(tmp_path)
    # the coordinator in this process (its two workers are processes of their own): one interpreter start fewer
    code, out, err = cli("run", str(exp), "--parallel", "2")
    assert code == 1, out + err  # one variant failed
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
    (sweep,) = c.search_runs([c.get_experiment_by_name("par").experiment_id], filter_string="tags.`rcnn_lab.kind` = 'sweep'")
    assert {r.data.tags["rcnn_lab.sweep"] for r in runs} == {sweep.info.run_id}  # one sweep run for both workers
    assert sweep.info.status == "FAILED" and sweep.data.tags["rcnn_lab.plan_size"] == "2"
    a = next(r for r in runs if r.data.tags["rcnn_lab.variant"] == "a")  # the summary, written once by the coordinator
    assert sweep.data.tags["mlflow.note.content"].startswith("**par**: 1 of 2 runs finished")
    assert sweep.data.metrics["segm_AP/a"] == pytest.approx(a.data.metrics["final/segm_AP"])

    def no_worker(*args, **kwargs):
        raise AssertionError(f"a worker started: {args}")

    monkeypatch.setattr(parallel.subprocess, "Popen", no_worker)
    code, out, err = cli("run", str(exp), "--parallel", "2", "--only", "a")
    assert code == 0, out + err  # a is finished: skipped without starting a worker, and no sweep run is left behind
    assert f"[a seed=0] skip   a seed=0 ({a.data.tags['rcnn_lab.config_hash']}): finished run {a.info.run_id}" in out, out
    assert [line.split()[:3] for line in out.splitlines()[-1:]] == [["a", "0", "SKIPPED"]], out
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.runner.plan import make_plan
    from rcnn_lab.runner.sweep import all_finished

    loaded = load_experiment(exp)
    assert all_finished(loaded, make_plan(loaded, ["a"]), force=True) is None  # --force: the workers retrain it
    assert all_finished(loaded, make_plan(loaded), force=False) is None  # bad failed: left to train
    assert len(c.search_runs([c.get_experiment_by_name("par").experiment_id], "tags.`rcnn_lab.kind` = 'sweep'")) == 1


def test_the_coordinator_waits_for_every_worker_and_checks_progress_meanwhile():
    import subprocess

    procs = [subprocess.Popen(["sleep", "0.1"]), subprocess.Popen(["sh", "-c", "sleep 0.5; exit 3"])]
    calls = []
    assert parallel.wait_all(procs, lambda: calls.append(time.monotonic()), poll_s=0.05) == [0, 3]
    assert len(calls) >= 3  # the second worker ran ~0.5 s: progress was looked at while it did
    assert parallel.wait_all([subprocess.Popen(["true"])], None, poll_s=0.05) == [0]


def test_the_sweep_summary_is_rewritten_only_when_more_runs_have_finished(monkeypatch):
    finished = []

    class Store:
        def search_runs(self, ids, filter_string, max_results):
            assert "FINISHED" in filter_string and "rcnn_lab.sweep" in filter_string
            if finished == ["down"]:
                raise ConnectionError("store not answering")
            return list(finished)

    written = []
    monkeypatch.setattr(parallel, "outcomes_from_store", lambda c, exp_id, plan, since: [f"o{len(finished)}"])
    monkeypatch.setattr(parallel, "_summarize", lambda c, sweep, summary, step: written.append((summary, step)))
    update = parallel._progress(Store(), "1", "exp", ["r1", "r2", "r3"], "sweep-id", 0,
                                lambda exp, outcomes, n: (outcomes, n))
    update()  # nothing finished yet: nothing written
    finished[:] = ["a"]
    update()
    update()  # the same count: not rewritten
    finished[:] = ["down"]
    update()  # an outage is not an error of the coordinator
    finished[:] = ["a", "b"]
    update()
    assert written == [((["o1"], 3), 1), ((["o2"], 3), 2)]
