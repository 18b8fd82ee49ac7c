"""Several processes: ``--nproc N`` (one run at a time over N DDP ranks) and ``--parallel K`` (K runs at once).

``--nproc N`` re-launches the same command as N local ranks around a rendezvous store that listens
on 127.0.0.1 only (``rcnn_lab.runner.launch``; runs over several machines use ``torchrun``
directly). Every rank walks the same deterministic plan; rank 0 alone talks to MLflow (decides
skip / resume / run, claims, logs) and broadcasts the run id to train, or None to skip
(:func:`announce`, :func:`follow_plan`). Errors that are the same on every rank (``RcnnLabError``:
bad input, a non-finite loss, which every rank sees because losses are averaged) are recorded by
rank 0 and every rank goes on to the next run; any other error ends the job on every rank
(:func:`must_abort`), so no rank is left waiting in a collective with a rank that moved on.

``--parallel K`` starts K ``rcnn-lab run ... --shard i/K`` worker processes (one GPU each via
``CUDA_VISIBLE_DEVICES``, or ``cores // K`` CPU threads each), prefixes each worker's output lines
with the run it is on, then reads MLflow to print one summary of the whole plan. Workers never
train the same config twice: see ``rcnn_lab.runner.claims``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rcnn_lab.engine import distributed
from rcnn_lab.errors import ConfigError, Problem, RcnnLabError
from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.lifeline import LAUNCHER_PID_VAR
from rcnn_lab.runner.outcome import Action, Outcome, Status
from rcnn_lab.runner.plan import output_dir

SWEEP_ENV = "RCNN_LAB_SWEEP_RUN"  # --parallel: the sweep run its coordinator made; the workers' runs belong to it
PROGRESS_POLL_S = 15.0  # --parallel: how often the coordinator looks for newly finished runs (one store query)


def given_sweep_run() -> str | None:
    """In a ``--parallel`` worker: the id of the invocation's one sweep run (its coordinator's)."""
    return os.environ.get(SWEEP_ENV) or None


# --- DDP ranks (under --nproc or torchrun) ----------------------------------------------------

def join(device) -> distributed.World:
    """Start of a sweep: a DDP rank joins the process group (on ``device``'s backend) before any
    decision is broadcast.

    From here on SIGTERM interrupts like Ctrl-C, in every process that trains: the run is recorded
    KILLED and rerunning the command resumes it. SIGTERM is how launchers stop ranks, how a
    ``--parallel`` worker learns that its coordinator died (``rcnn_lab.runner.lifeline``), and what
    a scheduler sends at a time limit (Slurm, Kubernetes) before SIGKILL. A rank may get both
    (Ctrl-C reaches it from the terminal and from its launcher), so in a rank only the first signal
    interrupts and later ones are ignored while the run is recorded (a launcher kills ranks that do
    not end within its grace period). Any other process interrupts on every signal, as Python does
    on Ctrl-C, so a second one still cuts a slow recording short.
    """
    w = distributed.env_world()
    if w.active:
        w, _ = distributed.setup(device)
    if threading.current_thread() is threading.main_thread():
        if w.active:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _interrupt)
        else:
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # Python's own Ctrl-C handler
    return w


def _interrupt(signum, frame):
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def announce(run_id: str | None) -> None:
    """Rank 0: tell the other ranks which run to train next (None: skip this planned run)."""
    distributed.broadcast(run_id)


def must_abort(exc: BaseException) -> bool:
    """In a distributed run, errors other than ``RcnnLabError`` end the job on every rank."""
    return distributed.world().active and not isinstance(exc, RcnnLabError)


def follow_plan(exp, plan, root: Path, inputs: dict) -> list:
    """Ranks > 0: train what rank 0 announces, without tracking; returns outcomes for symmetry.

    ``inputs``: this rank's ``preflight(plan)``.
    """
    from rcnn_lab.engine.trainer import Trainer

    outcomes = []
    for run in plan:
        run_id = distributed.broadcast(None)
        if run_id is None:
            outcomes.append(Outcome(run, Status.SKIPPED, Action.SKIP))
            continue
        started = time.perf_counter()
        try:
            result = Trainer(run.config, output_dir(root, exp, run), inputs=inputs.pop(run.hash, None)).fit()
            outcomes.append(Outcome(run, Status.FINISHED, Action.RUN, result.metrics, time.perf_counter() - started, run_id))
        except RcnnLabError as exc:  # the same on every rank: rank 0 records it, every rank goes on
            outcomes.append(Outcome(run, Status.FAILED, Action.RUN, {}, time.perf_counter() - started, run_id, str(exc)))
    return outcomes


def check_world(plan, nproc: int | None, file: str | None = None) -> None:
    """``data.batch_size`` is global: it must split evenly over the processes (checked before any run)."""
    n = nproc or distributed.env_world().size
    if n <= 1:
        return
    bad = sorted({r.config.data.batch_size for r in plan if r.config.data.batch_size % n})
    if bad:
        raise ConfigError([Problem("data.batch_size", f"{bad[0]} images per global batch cannot be split over {n} "
                                   f"processes; use a multiple of {n} (each process takes batch_size / {n})", file)])


# --- launching ---------------------------------------------------------------------------------

def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (and argparse's unambiguous prefixes of ``name``)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        head = token.split("=", 1)[0]
        if len(head) >= 4 and head.startswith("--") and name.startswith(head):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_env(index: int, workers: int, cuda: bool) -> dict[str, str]:
    """Environment of ``--parallel`` worker ``index``: its GPU, or its share of the CPU cores, and this
    process as its launcher (a worker ends with its coordinator, as a rank with ``launch``'s)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[LAUNCHER_PID_VAR] = str(os.getpid())
    if cuda:
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    threads = str(max(1, cores() // workers))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    return env


def prefixed(label: str, line: str) -> str:
    """A ``--parallel`` output line: prefixed with the run it is about."""
    return f"[{label}] {line}"


def _pump(proc: subprocess.Popen, labels: list[str], lock: threading.Lock) -> None:
    """Copy a worker's output lines, each prefixed with the run it is on."""
    current = labels[0] if labels else "?"
    for line in proc.stdout:
        for label in labels:
            if f"{label} (" in line:
                current = label
        with lock:
            sys.stdout.write(prefixed(current, line) if line.strip() else line)
            sys.stdout.flush()


def run_parallel(exp, plan, k: int, argv: list[str], cuda: bool, summarize=None) -> tuple[list, int]:
    """Train ``plan`` on ``k`` worker processes (one GPU each with ``cuda``); (one outcome per planned run
    read from MLflow, exit code). ``summarize``: as ``sweep.run_plan``'s, written to the sweep run as runs finish
    (checked every ``PROGRESS_POLL_S``) and once more at the end."""
    if k < 1:
        raise ConfigError([Problem("--parallel", f"must be >= 1, got {k}")])
    workers = max(1, min(k, len(plan)))
    uri = tr.resolve_uri(exp.tracking.uri)
    c = tr.client(uri)  # create the store and experiment once, before K workers race to
    exp_id = tr.experiment_id(c, exp.tracking_name, tr.default_artifact_root(uri))
    # one sweep run for the whole invocation: every worker's runs belong to it (report --out attaches there)
    sweep = tr.start_sweep(c, exp_id, exp, plan, tr.common_tags(exp, 1))
    base = strip_option(argv, "--parallel") + ["--no-progress", "--no-summary"]
    started_ms = int(time.time() * 1000)
    lock, procs, pumps = threading.Lock(), [], []
    status = Status.KILLED
    try:
        with tr.Heartbeat(c, sweep):
            for i in range(workers):
                cmd = [sys.executable, "-m", "rcnn_lab", *base, "--shard", f"{i}/{workers}"]
                proc = subprocess.Popen(cmd, env={**worker_env(i, workers, cuda), SWEEP_ENV: sweep},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
                pump = threading.Thread(target=_pump, args=(proc, [r.label for r in plan[i::workers]], lock),
                                        daemon=True)
                pump.start()
                procs.append(proc)
                pumps.append(pump)
            try:
                progress = _progress(c, exp_id, exp, plan, sweep, started_ms, summarize) if summarize else None
                codes = wait_all(procs, progress)
            except KeyboardInterrupt:  # the workers got the signal too: let them record KILLED, then stop
                for p in procs:
                    p.wait()
                raise
        for pump in pumps:
            pump.join()
        outcomes = outcomes_from_store(c, exp_id, plan, started_ms)
        code = max(codes)
        if code == 0 and any(o.status in (Status.FAILED, Status.PLANNED, Status.KILLED) for o in outcomes):
            code = 1
        status = Status.FAILED if code else Status.FINISHED
        if summarize is not None:
            _summarize(c, sweep, summarize(exp, outcomes, len(plan)), len([o for o in outcomes if o.metrics]))
    finally:
        _end_sweep(c, exp_id, sweep, status)
    return outcomes, code


def wait_all(procs: list, progress=None, poll_s: float = PROGRESS_POLL_S) -> list[int]:
    """The workers' exit codes, once all have ended; ``progress()`` every ``poll_s`` while any runs."""
    while True:
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return [p.wait() for p in procs]
        try:
            alive[0].wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if progress is not None:
                progress()


def _progress(c, exp_id: str, exp, plan, sweep: str, started_ms: int, summarize):
    """A callable that rewrites the sweep run's summary whenever more of its runs have finished (one query a poll)."""
    seen = [0]

    def update() -> None:
        try:
            done = c.search_runs([exp_id], filter_string=f"{tags.filter_equals(tags.SWEEP_RUN, sweep)} and "
                                 "attributes.status = 'FINISHED'", max_results=len(plan) + 1)
        except Exception:  # the store is not answering: the workers say so; the summary waits
            return
        if len(done) > seen[0]:
            seen[0] = len(done)
            outcomes = outcomes_from_store(c, exp_id, plan, started_ms)
            _summarize(c, sweep, summarize(exp, outcomes, len(plan)), seen[0])

    return update


def _summarize(c, sweep: str, summary: tuple[dict, str], step: int) -> None:
    """The sweep's summary (metrics, description) on its sweep run; the store has just answered (outcomes)."""
    from mlflow.entities import Metric, RunTag

    metrics, note = summary
    now = int(time.time() * 1000)
    try:
        c.log_batch(sweep, metrics=[Metric(k, v, now, step) for k, v in metrics.items() if v == v],
                    tags=[RunTag(tags.NOTE, note)], synchronous=True)
    except Exception:  # a view of what is stored: the runs themselves are complete
        pass


def _end_sweep(c, exp_id: str, sweep: str, status: Status) -> None:
    """End the invocation's sweep run; one that no run belongs to (everything was skipped) is deleted."""
    try:
        if c.search_runs([exp_id], filter_string=tags.filter_equals(tags.SWEEP_RUN, sweep), max_results=1):
            c.set_terminated(sweep, status.value)
        else:
            c.delete_run(sweep)
    except Exception:  # the store itself may be what failed; the next invocation marks a stale sweep run KILLED
        pass


def outcomes_from_store(c, exp_id: str, plan, since_ms: int) -> list:
    """One outcome per planned run from MLflow: its FINISHED run (SKIPPED if it ended before
    ``since_ms``), else its newest run's status; PLANNED when no run exists."""
    out = []
    for run in plan:
        runs = tr.runs_with_hash(c, exp_id, run.hash)
        done = [r for r in runs if r.info.status == "FINISHED"]
        r = done[0] if done else (runs[0] if runs else None)
        if r is None:
            out.append(Outcome(run, Status.PLANNED, Action.NONE))
            continue
        status = Status(r.info.status) if r.info.status in Status.__members__ else r.info.status
        if status == Status.FINISHED and (r.info.end_time or 0) < since_ms:
            status = Status.SKIPPED
        elif r.info.status == "RUNNING":
            status = Status.RUNNING_ELSEWHERE
        duration = ((r.info.end_time or 0) - r.info.start_time) / 1000 if status == Status.FINISHED else 0.0
        out.append(Outcome(run, status, Action.RUN, tr.final_metrics(r), max(duration, 0.0), r.info.run_id,
                           r.data.tags.get(tags.ERROR)))
    return out
