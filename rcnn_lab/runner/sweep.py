"""Run a plan: skip finished configs, resume interrupted ones, record failures and go on."""

from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rcnn_lab.config.loader import Experiment, flatten
from rcnn_lab.config.types import to_plain
from rcnn_lab.runner import artifacts
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.plan import PlannedRun

TAG = tr.TAG


@dataclass
class Outcome:
    run: PlannedRun
    status: str  # FINISHED | FAILED | SKIPPED | RUNNING-ELSEWHERE | PLANNED | KILLED
    action: str  # run | resume | skip | ...
    metrics: dict = field(default_factory=dict)
    duration_s: float = 0.0
    run_id: str | None = None
    error: str | None = None


def decide(c, exp_id: str | None, run: PlannedRun, force: bool) -> tuple[str, object | None]:
    """-> (action, existing run): run, resume, skip (finished), busy (claimed by a live worker)."""
    if c is None or exp_id is None:
        return "run", None
    existing = tr.runs_with_hash(c, exp_id, run.hash)
    if force:
        return "run", None
    if any(r.info.status == "FINISHED" for r in existing):
        return "skip", next(r for r in existing if r.info.status == "FINISHED")
    for r in existing:
        if r.info.status == "RUNNING" and not tr.claim_is_stale(r):
            return "busy", r
    for r in existing:  # newest unfinished run: resume into it
        return "resume", r
    return "run", None


def output_dir(root: Path, exp: Experiment, run: PlannedRun) -> Path:
    return root / "outputs" / exp.name / run.slug


def plan_actions(exp: Experiment, plan: list[PlannedRun], force: bool, root: Path) -> list[tuple[PlannedRun, str]]:
    """What a run would do, read-only (``--dry-run``): never creates a store."""
    uri = tr.resolve_uri(exp.variants[0].config.tracking.uri, root)
    if tr.local_store_missing(uri):
        return [(r, "run") for r in plan]
    c = tr.client(uri)
    name = exp.variants[0].config.tracking.experiment or exp.name
    e = c.get_experiment_by_name(name)
    return [(r, decide(c, e.experiment_id if e else None, r, force)[0]) for r in plan]


def run_plan(exp: Experiment, plan: list[PlannedRun], *, force: bool = False, root: Path = tr.DEFAULT_ROOT,
             progress: bool = True, echo=print) -> list[Outcome]:
    """Execute ``plan`` against MLflow; returns one outcome per planned run."""
    from rcnn_lab.engine.hooks import ProgressHook
    from rcnn_lab.engine.trainer import Trainer
    from rcnn_lab.runner.hooks import MLflowHook

    first = exp.variants[0].config
    uri = tr.resolve_uri(first.tracking.uri, root)
    c = tr.client(uri)  # unreachable store: fails here, before any training
    exp_id = tr.experiment_id(c, first.tracking.experiment or exp.name, tr.default_artifact_root(uri, root))
    parent = None
    outcomes: list[Outcome] = []
    common = {**tr.git_state(), **tr.versions(), f"{TAG}experiment_file": str(exp.path)}
    try:
        for run in plan:
            action, existing = decide(c, exp_id, run, force)
            if action == "skip":
                echo(f"skip   {run.label} ({run.hash}): finished run {existing.info.run_id} (--force reruns)")
                outcomes.append(Outcome(run, "SKIPPED", action, _final_metrics(existing), run_id=existing.info.run_id))
                continue
            if action == "busy":
                echo(f"skip   {run.label} ({run.hash}): running in another worker ({existing.info.run_id})")
                outcomes.append(Outcome(run, "RUNNING-ELSEWHERE", action, run_id=existing.info.run_id))
                continue
            if parent is None:
                parent = c.create_run(exp_id, run_name=f"{exp.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                      tags={**common, f"{TAG}kind": "sweep", f"{TAG}plan_size": str(len(plan))})
            out = output_dir(root, exp, run)
            if action == "resume":
                run_id = existing.info.run_id
                c.update_run(run_id, status="RUNNING")
                c.log_batch(run_id, tags=_tags(tr.claim_tags()))
                echo(f"resume {run.label} ({run.hash}) into run {run_id}")
            else:
                if out.exists():
                    shutil.rmtree(out)  # a fresh run (new or --force) starts from nothing
                run_id = _start_child(c, exp_id, parent.info.run_id, run, common)
                echo(f"run    {run.label} ({run.hash}) as run {run_id}")
            outcomes.append(_train_one(c, run_id, run, out, progress, Trainer, ProgressHook, MLflowHook, echo))
    except KeyboardInterrupt:
        if parent is not None:
            c.set_terminated(parent.info.run_id, "KILLED")
        raise
    if parent is not None:
        failed = any(o.status == "FAILED" for o in outcomes)
        c.set_terminated(parent.info.run_id, "FAILED" if failed else "FINISHED")
    return outcomes


def _tags(d: dict) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in d.items()]


def _start_child(c, exp_id: str, parent_id: str, run: PlannedRun, common: dict) -> str:
    import torch

    from rcnn_lab.engine.trainer import resolve_device

    device = str(resolve_device(run.config.train.device))
    tags = {
        **common, **tr.claim_tags(), "mlflow.parentRunId": parent_id, f"{TAG}kind": "variant",
        f"{TAG}variant": run.variant.name, f"{TAG}seed": str(run.seed), f"{TAG}config_hash": run.hash,
        f"{TAG}baseline": str(run.variant.baseline).lower(), f"{TAG}device": device,
        f"{TAG}changed": json.dumps(run.variant.changed)[:5000],
        f"{TAG}device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }
    r = c.create_run(exp_id, run_name=f"{run.variant.name} s{run.seed}", tags=tags)
    params = tr.flatten_params(flatten(to_plain(run.config)))
    for i in range(0, len(params), 100):
        c.log_batch(r.info.run_id, params=params[i:i + 100])
    c.log_text(r.info.run_id, yaml.safe_dump(to_plain(run.config), sort_keys=False), "config.yaml")
    return r.info.run_id


def _final_metrics(run) -> dict:
    return {k[len("final/"):]: v for k, v in (run.data.metrics if run else {}).items() if k.startswith("final/")}


def _train_one(c, run_id, run: PlannedRun, out: Path, progress, Trainer, ProgressHook, MLflowHook, echo) -> Outcome:
    started = time.perf_counter()
    t = run.config.tracking
    try:
        hook = MLflowHook(c, run_id, t.log_every or run.config.train.log_every, t.async_logging)
        trainer = Trainer(run.config, out, hooks=[ProgressHook(progress, run.label), hook, *artifacts.extra_hooks(run, c, run_id)])
        if trainer.start_iteration == 0:
            c.log_text(run_id, artifacts.model_summary(trainer.model), "model_summary.txt")
        result = trainer.fit()
        final = {f"final/{k}": v for k, v in result.metrics.items()}
        hook.buffer += [hook._metric(k, v, result.iterations) for k, v in final.items()]
        hook.flush(synchronous=True)
        artifacts.log_results(c, run_id, trainer, result, out, t.log_checkpoint)
        c.set_terminated(run_id, "FINISHED")
        return Outcome(run, "FINISHED", "run", result.metrics, time.perf_counter() - started, run_id)
    except KeyboardInterrupt:
        c.set_terminated(run_id, "KILLED")
        raise
    except Exception as exc:  # recorded, not swallowed: tag + artifact, and the sweep goes on
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        c.set_tag(run_id, f"{TAG}error", message)
        c.log_text(run_id, traceback.format_exc(), "error.txt")
        c.set_terminated(run_id, "FAILED")
        echo(f"FAILED {run.label}: {message}")
        return Outcome(run, "FAILED", "run", {}, time.perf_counter() - started, run_id, message)
