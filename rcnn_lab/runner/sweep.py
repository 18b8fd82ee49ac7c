"""Run a plan: skip finished configs, resume interrupted ones, record failures and go on."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from rcnn_lab.config.loader import Experiment, flatten
from rcnn_lab.config.types import to_plain
from rcnn_lab.engine import distributed
from rcnn_lab.engine.device import device_name
from rcnn_lab.engine.hooks import Periods, ProgressHook, StopTraining
from rcnn_lab.engine.preflight import RunInputs, preflight, prepare
from rcnn_lab.engine.trainer import Trainer
from rcnn_lab.runner import artifacts, claims, journal, outage, parallel, tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner import weights as run_weights
from rcnn_lab.runner.hooks import MLflowHook
from rcnn_lab.runner.inputs import dataset_inputs
from rcnn_lab.runner.outcome import Action, Outcome, Status
from rcnn_lab.runner.plan import PlannedRun, output_dir

__all__ = ["Action", "Outcome", "Status", "decide", "plan_actions", "run_plan"]

Summarize = Callable[[Experiment, list[Outcome], int], tuple[dict[str, float], str]]  # (exp, outcomes, planned)
OUTAGE_WAIT_S = 60.0  # at the end of an invocation: how long to wait for a store that stopped answering
INTERRUPTED_WAIT_S = 5.0  # the same after Ctrl-C


def decide(c, exp_id: str | None, run: PlannedRun, force: bool) -> tuple[Action, object | None]:
    """-> (action, existing run): run, resume, skip (finished), busy (claimed by a live worker).

    ``resume`` continues the newest interrupted run (KILLED, or RUNNING with a dead worker) from its
    last checkpoint; a FAILED newest run is kept as the record of the failure and a fresh run starts.
    """
    if force or c is None or exp_id is None:
        return Action.RUN, None
    existing = tr.runs_with_hash(c, exp_id, run.hash)
    if any(r.info.status == "FINISHED" for r in existing):
        return Action.SKIP, next(r for r in existing if r.info.status == "FINISHED")
    for r in existing:
        if r.info.status == "RUNNING" and not tr.claim_is_stale(r):
            return Action.BUSY, r
    if existing and existing[0].info.status in ("RUNNING", "KILLED"):
        return Action.RESUME, existing[0]
    return Action.RUN, None


def _decisions(c, exp: Experiment, plan: list[PlannedRun], force: bool) -> list[tuple[PlannedRun, Action, object | None]]:
    """(run, action, existing run or None) per planned run, read-only; ``c``: the store's client, None where
    there is no store yet."""
    e = c.get_experiment_by_name(exp.tracking_name) if c is not None else None
    return [(r, *decide(c, e.experiment_id if e else None, r, force)) for r in plan]


def plan_actions(exp: Experiment, plan: list[PlannedRun], force: bool,
                 root: Path | None = None) -> list[tuple[PlannedRun, Action]]:
    """What a run would do, read-only (``--dry-run``): never creates a store."""
    uri = tr.resolve_uri(exp.tracking.uri, root)
    c = None if tr.local_store_missing(uri) else tr.client(uri)
    return [(r, action) for r, action, _ in _decisions(c, exp, plan, force)]


def run_plan(exp: Experiment, plan: list[PlannedRun], *, inputs: dict[str, RunInputs] | None = None,
             force: bool = False, root: Path | None = None, progress: bool = True, echo=print,
             summarize: Summarize | None = None,
             parent: str | None = None, child_tags: dict[str, str] | None = None,
             hooks: Callable[[PlannedRun], list] | None = None) -> list[Outcome]:
    """Execute ``plan`` against MLflow; returns one outcome per planned run.

    ``inputs`` are what ``preflight(plan)`` checked (run here when not given: bad input raises
    ``ConfigError`` before any store is touched). ``root`` holds outputs (``outputs/EXP/RUN``) and
    local artifacts; default ``tr.runs_root(uri)``. ``summarize(exp, outcomes, len(plan))`` -> (metrics, markdown):
    the sweep's summary, written to the sweep run (metrics, and its description ``tags.NOTE``) each time
    a run ends (the statistics live in ``report``, above this layer: the caller hands them down).

    Extension points for the layers above (which the runner knows nothing of): ``parent`` nests the runs under
    an existing run (left as it is at the end), ``child_tags`` are added to every new run, ``hooks(run)`` gives
    extra training hooks per run; a hook that raises ``engine.hooks.StopTraining`` ends its run early
    (``Status.STOPPED``, KILLED in MLflow with the iteration reached, checkpoint kept).
    """
    inputs = dict(preflight(plan) if inputs is None else inputs)  # each run takes (and releases) its own
    uri = tr.resolve_uri(exp.tracking.uri, root)
    if plan and not parallel.join(inputs[plan[0].hash].device).main:  # torchrun rank > 0: train what rank 0 announces
        return parallel.follow_plan(exp, plan, Path(root) if root is not None else tr.runs_root(uri), inputs)
    c = tr.client(uri)  # unreachable store: fails here, before any training
    root = Path(root) if root is not None else tr.runs_root(uri)
    inputs = run_weights.resolve_inputs(exp, plan, inputs, root, c)  # model.weights run:<id> -> its checkpoint
    exp_id = tr.experiment_id(c, exp.tracking_name, tr.default_artifact_root(uri, root))
    nest = parent is not None  # a caller's run (a search study) holds its runs nested; a sweep's runs are flat (tags.SWEEP_RUN)
    given = parent or parallel.given_sweep_run()  # --parallel: the coordinator's sweep run; it also ends it
    stale, kept = claims.end_stale_sweeps(c, exp_id, None if given else tr.plan_key(exp, plan))
    for run_id in stale:
        echo(f"marked KILLED: sweep run {run_id} (its process is gone)")
    parent = given or (kept.info.run_id if kept else None)
    outcomes: list[Outcome] = []
    common = {**tr.common_tags(exp, distributed.world().size), **(child_tags or {})}
    beats = contextlib.ExitStack()  # the parent's heartbeat, from its creation to the end of the sweep
    journals: list[journal.Journal] = []  # of the runs trained here: their writes may still be on their way
    server = uri.startswith(("http://", "https://"))  # a local store fails at once: nothing to probe
    watch = beats.enter_context(outage.Watch(uri, echo, OUTAGE_WAIT_S, (lambda: tr.probe(uri)) if server else None))
    summary = _Summary(c, exp, root, summarize, watch, journals, echo, len(plan))
    if kept is not None:  # the same command, left RUNNING (outage, kill -9) or KILLED (Ctrl-C): this invocation continues it
        echo(f"continue sweep run {parent} (the same command, interrupted or cut off from the store before)")
        beats.enter_context(tr.Heartbeat(c, parent))
        summary.attach(parent)
    interrupted = crashed = False
    run = None
    try:
        for run in plan:
            run_inputs = inputs.pop(run.hash, None)  # a dataset is released after the last run that uses it
            out = output_dir(root, exp, run)
            replay_leftovers(c, out, run, echo)  # what an earlier invocation could not store, before any decision
            action, existing = decide(c, exp_id, run, force)
            if action == Action.RESUME and not claims.take_over(c, existing):  # another worker took it first
                action = Action.BUSY
            if action == Action.SKIP:
                echo(skip_line(run, existing.info.run_id))
                outcomes.append(Outcome(run, Status.SKIPPED, action, tr.final_metrics(existing), run_id=existing.info.run_id))
                summary.update(outcomes)
                parallel.announce(None)
                continue
            if action == Action.BUSY:
                echo(f"skip   {run.label} ({run.hash}): running in another worker ({existing.info.run_id})")
                outcomes.append(Outcome(run, Status.RUNNING_ELSEWHERE, action, run_id=existing.info.run_id))
                parallel.announce(None)
                continue
            run_inputs = run_inputs or prepare(run.config)  # a config planned twice (--seeds 0,0 --force)
            run = replace(run, config=run_inputs.resolve(run.config))  # num_classes: auto -> the data's (params, config.yaml)
            if parent is None:
                parent = tr.start_sweep(c, exp_id, exp, plan, common)
                beats.enter_context(tr.Heartbeat(c, parent))
                summary.attach(parent, outcomes)
            if action == Action.RESUME:  # claims.take_over marked it RUNNING with our claim
                run_id = existing.info.run_id
                echo(f"resume {run.label} ({run.hash}) into run {run_id}")
            else:
                run_id = _start_child(c, exp_id, parent, exp, run, run_inputs.device, common, nest)
                rival = claims.rival(c, exp_id, run.hash, run_id, finished_wins=not force)
                if rival is not None:  # another worker claimed this config first: back off
                    claims.back_off(c, run_id, rival)
                    busy = rival.info.status != "FINISHED"
                    echo(f"skip   {run.label} ({run.hash}): {'claimed by another worker' if busy else 'finished'} "
                         f"({rival.info.run_id})")
                    outcomes.append(Outcome(run, Status.RUNNING_ELSEWHERE if busy else Status.SKIPPED,
                                            Action.BUSY if busy else Action.SKIP, tr.final_metrics(rival),
                                            run_id=rival.info.run_id))
                    parallel.announce(None)
                    continue
                if out.exists():
                    shutil.rmtree(out)  # a fresh run (new or --force) starts from nothing, once claimed
                echo(f"run    {run.label} ({run.hash}) as run {run_id}")
            parallel.announce(run_id)  # torchrun: the other ranks train this run with rank 0
            with tr.Heartbeat(c, run_id):  # the claim stays live through long evaluations too
                outcomes.append(_train_one(c, run_id, run, out, action, run_inputs, journals, progress=progress, echo=echo,
                                           extra=hooks(run) if hooks is not None else [], watch=watch, title=tr.child_name(exp, run)))
            summary.update(outcomes)
    except KeyboardInterrupt:
        interrupted = True
        raise
    except Exception as exc:
        crashed = True
        if not tr.unreachable(exc):
            raise
        raise tr.TrackingError(f"tracking store {uri} stopped answering ({tr.failure_reason(exc)}) before "
                               f"{run.label if run else 'the first run'}; run the same command again once it answers "
                               "(finished runs are skipped, interrupted ones resume)") from None
    finally:
        unstored = _close_journals(journals, uri, exp, INTERRUPTED_WAIT_S if interrupted else OUTAGE_WAIT_S, echo)
        summary.tidy()
        beats.close()
        for o in outcomes:
            o.unstored = o.run_id in unstored
        if parent is not None and parent != given and not unstored:
            failed = crashed or any(o.status == Status.FAILED for o in outcomes)
            status = Status.KILLED if interrupted else Status.FAILED if failed else Status.FINISHED
            _quietly(c.set_terminated, parent, status.value)
        trained = any(o.action in (Action.RUN, Action.RESUME) for o in outcomes)
        if parent is not None and (parent != given or trained) and not (interrupted or crashed or unstored):
            echo(f"tracked in {uri}: experiment {exp.tracking_name!r}, sweep run {parent} (rcnn-lab ui to browse)")
    return outcomes


class _Summary:
    """The sweep run's summary (``summarize``'s metrics and markdown description), rewritten as runs end through
    the sweep run's own journal (``outputs/EXP/sweep-RUN_ID/tracking``): it never holds up training either."""

    def __init__(self, c, exp: Experiment, root: Path, summarize: Summarize | None, watch, journals: list, echo,
                 planned: int):
        self.c, self.exp, self.root, self.summarize, self.watch = c, exp, Path(root), summarize, watch
        self.planned = planned
        self.journals, self.echo, self.journal = journals, echo, None

    def attach(self, parent: str, outcomes: list[Outcome] = ()) -> None:
        """Write to sweep run ``parent`` from now on (a continued one first stores what its journal kept)."""
        if self.summarize is None:
            return
        self.where = journal.folder(self.root / "outputs" / self.exp.name / f"sweep-{parent}")
        self.journal = journal.Journal(self.c, parent, self.where, watch=self.watch)
        self.journals.append(self.journal)
        if outcomes:
            self.update(outcomes)

    def update(self, outcomes: list[Outcome]) -> None:
        if self.journal is None:
            return
        try:
            metrics, note = self.summarize(self.exp, outcomes, self.planned)
        except Exception as exc:  # a summary is a view: a bug in it must not stop the sweep
            self.echo(f"warning: the sweep run's summary was not updated ({type(exc).__name__}: {exc})".splitlines()[0])
            return
        now, step = int(time.time() * 1000), sum(1 for o in outcomes if o.metrics)
        self.journal.metrics([(k, v, now, step) for k, v in metrics.items() if v == v])  # v == v: not NaN
        self.journal.tags({tags.NOTE: note})

    def tidy(self) -> None:
        """Once its journal is closed: the sweep's output folder goes when nothing is left in it to store."""
        if self.journal is not None and not self.where.exists():
            with contextlib.suppress(OSError):
                self.where.parent.rmdir()


def skip_line(run: PlannedRun, run_id: str) -> str:
    """What a finished run's skip says (``run_plan``, and ``--parallel`` when no worker is needed)."""
    return f"skip   {run.label} ({run.hash}): finished run {run_id} (--force reruns)"


def all_finished(exp: Experiment, plan: list[PlannedRun], force: bool, echo=print) -> list[Outcome] | None:
    """``--parallel``: when every planned run is FINISHED in the store, their outcomes, each echoed as a worker
    would have skipped it; None when a run is left to train (or ``force``): then the workers start. A rerun of
    a finished sweep starts no worker processes (seconds each) and no sweep run. Writes that an earlier
    invocation left in a journal are stored first, as ``run_plan`` stores them."""
    uri = tr.resolve_uri(exp.tracking.uri)
    if force or not plan or tr.local_store_missing(uri):
        return None
    root, c = tr.runs_root(uri), tr.client(uri)
    for run in plan:
        replay_leftovers(c, output_dir(root, exp, run), run, echo)
    decisions = _decisions(c, exp, plan, force)
    if any(action != Action.SKIP for _, action, _ in decisions):
        return None
    for run, _, existing in decisions:
        echo(parallel.prefixed(run.label, skip_line(run, existing.info.run_id)))
    return [Outcome(run, Status.SKIPPED, action, tr.final_metrics(existing), run_id=existing.info.run_id)
            for run, action, existing in decisions]


def replay_leftovers(c, out: Path, run: PlannedRun, echo) -> None:
    """Store the writes an earlier invocation left in ``out``'s journal (the store was down when it ended)."""
    stored = journal.replay(c, journal.folder(out))
    if stored is not None and stored.unstored:
        echo(f"stored {run.label}: {stored.describe()} that an earlier invocation could not store (run {stored.run_id})")


def _close_journals(journals: list, uri: str, exp: Experiment, wait_s: float, echo) -> set[str]:
    """Let every run's writes reach the store (waiting at most ``wait_s`` of an outage); one line for
    what could not be stored and how to store it. -> the run ids with writes left on disk."""
    left, notes = [], []
    for j in journals:
        b = j.close(wait_s)
        if b.unstored:
            left.append(b)
        if b.dropped:
            notes.append(f"{b.dropped:,} per-step metric points of run {b.run_id} were dropped during the outage "
                         "(the journal reached tracking.outage_buffer_mb)")
        if b.rejected:
            notes.append(f"{b.rejected} write(s) to run {b.run_id} were refused by the store ({b.reason})")
    for note in notes:
        echo(f"tracking: {note}")
    if left:
        since = min((b.since for b in left if b.since), default=None)
        when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}" if since else ""
        reason = next((b.outage for b in left if b.outage), "no answer")
        what = "; ".join(f"run {b.run_id}: {b.describe()}" for b in left)
        echo(f"tracking store {uri} unreachable{when} ({reason}): not stored for {len(left)} run(s) ({what}); kept on "
             f"disk beside their checkpoints; run `rcnn-lab run {exp.path}` again once the store answers: it stores "
             "them first and retrains nothing that finished")
    return {b.run_id for b in left}


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except Exception:  # the store itself may be what failed; the next invocation marks a stale sweep run KILLED
        pass


def _start_child(c, exp_id: str, parent_id: str, exp: Experiment, run: PlannedRun, device, common: dict,
                 nest: bool = False) -> str:
    run_tags = {
        **common, **tr.claim_tags(), tags.SWEEP_RUN: parent_id, **({tags.PARENT: parent_id} if nest else {}),
        tags.KIND: tags.VARIANT_RUN,
        tags.VARIANT: run.variant.name, tags.SEED: str(run.seed), tags.CONFIG_HASH: run.hash,
        tags.BASELINE: str(run.variant.baseline).lower(), tags.DEVICE: str(device),
        tags.CHANGED: json.dumps(run.variant.changed)[:5000], tags.DEVICE_NAME: device_name(device),
        tags.OVERRIDES: json.dumps(command_line_keys(run.variant))[:5000],
        tags.THREADS: str(torch.get_num_threads()),
    }
    r = c.create_run(exp_id, run_name=tr.child_name(exp, run), tags=run_tags)
    params = tr.flatten_params(flatten(to_plain(run.config)))
    for i in range(0, len(params), 100):
        c.log_batch(r.info.run_id, params=params[i:i + 100])
    c.log_text(r.info.run_id, yaml.safe_dump(to_plain(run.config), sort_keys=False), "config.yaml")
    return r.info.run_id


def command_line_keys(variant) -> dict:
    """The changed keys set on the command line (``--set``, ``--device``), not by the experiment's files."""
    return {k: v for k, v in variant.changed.items() if variant.source_of(k).startswith("--")}


def _train_one(c, run_id: str, run: PlannedRun, out: Path, action: Action, inputs: RunInputs, journals: list, *,
               progress: bool, echo, watch=None, title: str = "", extra: list = ()) -> Outcome:
    """Train one run. Every write to its MLflow run goes through its journal (appended to ``journals``):
    training, failure records included, goes on whether or not the store answers."""
    started = time.perf_counter()
    t, periods = run.config.tracking, Periods.of(run.config.train)
    j = journal.Journal(c, run_id, journal.folder(out), max_bytes=t.outage_buffer_mb * journal.MIB, watch=watch)
    journals.append(j)
    hook = MLflowHook(j, t.log_every or periods.log_every, periods, t.async_logging)
    try:
        hooks = [ProgressHook(periods, progress, run.label), *artifacts.extra_hooks(run, j), *extra, hook]
        trainer = Trainer(run.config, out, hooks=hooks, inputs=inputs)
        if trainer.weights_report is not None:  # model.weights loaded (a fresh run, not a resumed one)
            artifacts.log_weights(j, trainer.weights_report)
            echo(f"weights {run.label}: {trainer.weights_report.source}: {trainer.weights_report.summary()}")
        if trainer.start_iteration == 0:
            j.text(artifacts.model_summary(trainer.model), "model_summary.txt")
            j.inputs(dataset_inputs(run.config, trainer.train_set, trainer.val_set))
        result = trainer.fit()
        result.metrics.update(artifacts.cost_metrics(trainer, result))
        hook.log_final(result.metrics, result.iterations)
        artifacts.log_results(j, trainer, result, out, t.log_checkpoint, title or run.label)
        j.end(Status.FINISHED.value)
        return Outcome(run, Status.FINISHED, action, result.metrics, time.perf_counter() - started, run_id)
    except StopTraining as stop:  # a hook ended it early: KILLED (resumable from its checkpoint), with where and why
        hook.flush(synchronous=True)
        j.tags({tags.STOPPED_AT: str(stop.iteration), tags.STOP_REASON: stop.reason[:500]})
        j.end(Status.KILLED.value)
        echo(f"stop   {run.label} at iteration {stop.iteration}: {stop.reason}")
        return Outcome(run, Status.STOPPED, action, {}, time.perf_counter() - started, run_id, stop.reason)
    except KeyboardInterrupt:  # Ctrl-C: keep what was measured, mark KILLED; the next invocation resumes
        hook.flush(synchronous=True)
        j.end(Status.KILLED.value)
        raise
    except Exception as exc:  # recorded, not swallowed: tag + artifact, and the sweep goes on
        hook.flush(synchronous=True)
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        j.tags({tags.ERROR: message})
        j.text(traceback.format_exc(), "error.txt")
        j.end(Status.FAILED.value)
        echo(f"FAILED {run.label}: {message}")
        if parallel.must_abort(exc):  # not known to be the same on every rank: end the distributed job
            raise
        return Outcome(run, Status.FAILED, action, {}, time.perf_counter() - started, run_id, message)
