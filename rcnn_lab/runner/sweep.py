"""Run a plan: skip finished configs, resume interrupted ones, record failures and go on."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import traceback
from pathlib import Path

import torch
import yaml

from rcnn_lab.config.loader import Experiment, flatten
from rcnn_lab.config.types import to_plain
from rcnn_lab.engine import distributed
from rcnn_lab.engine.device import device_name
from rcnn_lab.engine.hooks import Periods, ProgressHook
from rcnn_lab.engine.preflight import RunInputs, preflight, prepare
from rcnn_lab.engine.trainer import Trainer
from rcnn_lab.runner import artifacts, claims, parallel, tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.hooks import MLflowHook
from rcnn_lab.runner.inputs import log_datasets
from rcnn_lab.runner.outcome import Action, Outcome, Status
from rcnn_lab.runner.plan import PlannedRun, output_dir

__all__ = ["Action", "Outcome", "Status", "decide", "plan_actions", "run_plan"]


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


def plan_actions(exp: Experiment, plan: list[PlannedRun], force: bool,
                 root: Path | None = None) -> list[tuple[PlannedRun, Action]]:
    """What a run would do, read-only (``--dry-run``): never creates a store."""
    uri = tr.resolve_uri(exp.tracking.uri, root)
    if tr.local_store_missing(uri):
        return [(r, Action.RUN) for r in plan]
    c = tr.client(uri)
    e = c.get_experiment_by_name(exp.tracking_name)
    return [(r, decide(c, e.experiment_id if e else None, r, force)[0]) for r in plan]


def run_plan(exp: Experiment, plan: list[PlannedRun], *, inputs: dict[str, RunInputs] | None = None,
             force: bool = False, root: Path | None = None, progress: bool = True, echo=print) -> list[Outcome]:
    """Execute ``plan`` against MLflow; returns one outcome per planned run.

    ``inputs`` are what ``preflight(plan)`` checked (run here when not given: bad input raises
    ``ConfigError`` before any store is touched). ``root`` holds outputs (``outputs/EXP/RUN``) and
    local artifacts; default ``tr.runs_root(uri)``.
    """
    inputs = dict(preflight(plan) if inputs is None else inputs)  # each run takes (and releases) its own
    uri = tr.resolve_uri(exp.tracking.uri, root)
    if plan and not parallel.join(inputs[plan[0].hash].device).main:  # torchrun rank > 0: train what rank 0 announces
        return parallel.follow_plan(exp, plan, Path(root) if root is not None else tr.runs_root(uri), inputs)
    c = tr.client(uri)  # unreachable store: fails here, before any training
    root = Path(root) if root is not None else tr.runs_root(uri)
    exp_id = tr.experiment_id(c, exp.tracking_name, tr.default_artifact_root(uri, root))
    for stale in claims.end_stale_sweeps(c, exp_id):
        echo(f"marked KILLED: sweep run {stale} (its process is gone)")
    parent = None
    outcomes: list[Outcome] = []
    common = {**tr.git_state(), **tr.versions(), tags.EXPERIMENT_FILE: str(exp.path),
              tags.WORLD_SIZE: str(distributed.world().size)}
    beats = contextlib.ExitStack()  # the parent's heartbeat, from its creation to the end of the sweep
    try:
        for run in plan:
            run_inputs = inputs.pop(run.hash, None)  # a dataset is released after the last run that uses it
            action, existing = decide(c, exp_id, run, force)
            if action == Action.RESUME and not claims.take_over(c, existing):  # another worker took it first
                action = Action.BUSY
            if action == Action.SKIP:
                echo(f"skip   {run.label} ({run.hash}): finished run {existing.info.run_id} (--force reruns)")
                outcomes.append(Outcome(run, Status.SKIPPED, action, tr.final_metrics(existing), run_id=existing.info.run_id))
                parallel.announce(None)
                continue
            if action == Action.BUSY:
                echo(f"skip   {run.label} ({run.hash}): running in another worker ({existing.info.run_id})")
                outcomes.append(Outcome(run, Status.RUNNING_ELSEWHERE, action, run_id=existing.info.run_id))
                parallel.announce(None)
                continue
            run_inputs = run_inputs or prepare(run.config)  # a config planned twice (--seeds 0,0 --force)
            if parent is None:
                parent = c.create_run(exp_id, run_name=f"{exp.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                      tags={**common, **tr.claim_tags(), tags.KIND: tags.SWEEP,
                                            tags.PLAN_SIZE: str(len(plan))})
                beats.enter_context(tr.Heartbeat(c, parent.info.run_id))
            out = output_dir(root, exp, run)
            if action == Action.RESUME:  # claims.take_over marked it RUNNING with our claim
                run_id = existing.info.run_id
                echo(f"resume {run.label} ({run.hash}) into run {run_id}")
            else:
                run_id = _start_child(c, exp_id, parent.info.run_id, run, run_inputs.device, common)
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
                outcomes.append(_train_one(c, run_id, run, out, action, run_inputs, progress=progress, echo=echo))
    except KeyboardInterrupt:
        beats.close()
        if parent is not None:
            c.set_terminated(parent.info.run_id, Status.KILLED.value)
        raise
    finally:
        beats.close()
    if parent is not None:
        failed = any(o.status == Status.FAILED for o in outcomes)
        c.set_terminated(parent.info.run_id, (Status.FAILED if failed else Status.FINISHED).value)
        echo(f"tracked in {uri}: experiment {exp.tracking_name!r}, parent run {parent.info.run_id} (rcnn-lab ui to browse)")
    return outcomes


def _start_child(c, exp_id: str, parent_id: str, run: PlannedRun, device, common: dict) -> str:
    run_tags = {
        **common, **tr.claim_tags(), tags.PARENT: parent_id, tags.KIND: tags.VARIANT_RUN,
        tags.VARIANT: run.variant.name, tags.SEED: str(run.seed), tags.CONFIG_HASH: run.hash,
        tags.BASELINE: str(run.variant.baseline).lower(), tags.DEVICE: str(device),
        tags.CHANGED: json.dumps(run.variant.changed)[:5000], tags.DEVICE_NAME: device_name(device),
        tags.OVERRIDES: json.dumps(command_line_keys(run.variant))[:5000],
        tags.THREADS: str(torch.get_num_threads()),
    }
    r = c.create_run(exp_id, run_name=f"{run.variant.name} s{run.seed}", tags=run_tags)
    params = tr.flatten_params(flatten(to_plain(run.config)))
    for i in range(0, len(params), 100):
        c.log_batch(r.info.run_id, params=params[i:i + 100])
    c.log_text(r.info.run_id, yaml.safe_dump(to_plain(run.config), sort_keys=False), "config.yaml")
    return r.info.run_id


def command_line_keys(variant) -> dict:
    """The changed keys set on the command line (``--set``, ``--device``), not by the experiment's files."""
    return {k: v for k, v in variant.changed.items() if variant.source_of(k).startswith("--")}


def _train_one(c, run_id: str, run: PlannedRun, out: Path, action: Action, inputs: RunInputs, *,
               progress: bool, echo) -> Outcome:
    started = time.perf_counter()
    t, periods = run.config.tracking, Periods.of(run.config.train)
    hook = MLflowHook(c, run_id, t.log_every or periods.log_every, periods, t.async_logging)
    try:
        hooks = [ProgressHook(periods, progress, run.label), *artifacts.extra_hooks(run, c, run_id), hook]
        trainer = Trainer(run.config, out, hooks=hooks, inputs=inputs)
        if trainer.start_iteration == 0:
            c.log_text(run_id, artifacts.model_summary(trainer.model), "model_summary.txt")
            log_datasets(c, run_id, run.config, trainer.train_set, trainer.val_set)
        result = trainer.fit()
        result.metrics.update(artifacts.cost_metrics(trainer, result))
        hook.log_final(result.metrics, result.iterations)
        artifacts.log_results(c, run_id, trainer, result, out, t.log_checkpoint)
        c.set_terminated(run_id, Status.FINISHED.value)
        return Outcome(run, Status.FINISHED, action, result.metrics, time.perf_counter() - started, run_id)
    except KeyboardInterrupt:  # Ctrl-C: keep what was measured, mark KILLED; the next invocation resumes
        _flush_quietly(hook)
        c.set_terminated(run_id, Status.KILLED.value)
        raise
    except Exception as exc:  # recorded, not swallowed: tag + artifact, and the sweep goes on
        _flush_quietly(hook)
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        c.set_tag(run_id, tags.ERROR, message)
        c.log_text(run_id, traceback.format_exc(), "error.txt")
        c.set_terminated(run_id, Status.FAILED.value)
        echo(f"FAILED {run.label}: {message}")
        if parallel.must_abort(exc):  # not known to be the same on every rank: end the distributed job
            raise
        return Outcome(run, Status.FAILED, action, {}, time.perf_counter() - started, run_id, message)


def _flush_quietly(hook) -> None:
    """Best effort: the metrics logged before an interruption or failure are stored too."""
    try:
        hook.flush(synchronous=True)
    except Exception:  # the store itself may be what failed; the status update below still matters
        pass
