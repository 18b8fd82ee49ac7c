"""``rcnn-lab eval``: evaluate given weights on each chosen variant's ``data.val``, one MLflow run of kind ``eval`` each.

Before any run exists, for the whole invocation: the weights are read once (``--weights``: a torchvision
name, a state_dict or an rcnn-lab checkpoint, through ``engine.weights``; ``--run``: a finished run's
last checkpoint, ``runner.weights``), every chosen variant's model is checked to take *all* its tensors
from them (an evaluation of partly random weights is an error, not a number), and each variant's device
and validation set are built (``engine.preflight.prepare_eval``: ``data.train`` is never read). Bad
input raises ``ConfigError`` naming the flag: no store is created and no run is written.

Then per variant, as a sweep does for training (``runner.sweep.decide``): an eval run of the same
*eval hash* (the variant's config hash and the weights' identity) that FINISHED is skipped unless
``force``; otherwise a run of kind ``eval`` is created and written through its journal
(``runner.journal``): the resolved config as params, the final metrics as ``final/<name>`` at the
weights' iteration (``report`` reads them like a trained run's), per-class AP, the saved detections
(``eval/detections.json.gz``: ``report --errors``), the gallery (``eval.gallery``), the model summary,
the validation set as run input and the weights' load report (``weights.txt``). The evaluation is the
trainer's own (``engine.evaluator``), so evaluating a finished run's last checkpoint with the
experiment that trained it gives the metrics that run logged as its final evaluation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from rcnn_lab.config.loader import Experiment
from rcnn_lab.errors import ConfigError, Problem, display_path
from rcnn_lab.runner import artifacts, journal, tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.outcome import Action, Outcome, Status
from rcnn_lab.runner.plan import PlannedRun, make_plan, output_dir

OUTAGE_WAIT_S = 60.0  # at the end: how long to wait for a store that stopped answering (as a sweep does)


@dataclass(frozen=True)
class Weights:
    """The weights an invocation evaluates, read once."""

    flag: str  # --weights | --run: named in every error about them
    source: str  # what they are, for people: torchvision's name, a file, "run <id> (iter_0000200.pt)"
    identity: str  # what they are, for the eval hash: the weights name, sha256:<digest> of a file, run:<id>
    label: str  # short, for report rows: the name, the file name, "run <id[:8]>"
    state: dict
    iteration: int = 0  # the step the weights stand for: a checkpoint's iteration, else 0
    run_id: str | None = None  # --run: the evaluated run
    seed: int | None = None  # --run: that run's seed (its config is evaluated with it)


def read_weights(weights: str | None, run_id: str | None, uri: str, root: Path | None = None,
                 with_masks: bool = True) -> Weights:
    """The weights of ``--weights`` or ``--run`` (exactly one given: ``cli/eval.py`` checks); ``ConfigError`` naming the flag.

    ``--run`` (or ``--weights run:<id>``) is looked up in the store at ``uri`` (never created) and read from
    its last checkpoint (``runner.weights.checkpoint_of_run``: its output folder under ``root``, else its
    ``checkpoint`` artifact); the run's seed is evaluated with it.
    """
    from rcnn_lab.engine import checkpoint as ckpt
    from rcnn_lab.engine import weights as w
    from rcnn_lab.engine.hub_weights import hub_enum, is_hub_name
    from rcnn_lab.runner import weights as run_weights

    if weights is not None and w.is_run(weights.strip()):  # --weights run:<id> is --run <id>
        weights, run_id = None, w.run_id_of(weights.strip())
    if run_id is not None:
        run_id = run_id.strip()
        c = run_weights.open_store(uri, "--run")
        seed = run_weights.find_run(c, run_id, "--run").data.tags.get(tags.SEED, "")
        path = run_weights.checkpoint_of_run(c, run_id, root if root is not None else tr.runs_root(uri), "--run")
        state, _ = w.read_state(str(path), key="--run", with_masks=with_masks)
        return Weights("--run", f"run {run_id} ({path.name})", f"{w.RUN_PREFIX}{run_id}", f"run {run_id[:8]}", state,
                       ckpt.iteration_of(path) or 0, run_id, int(seed) if seed.lstrip("-").isdigit() else None)
    spec = weights.strip()
    state, identity = w.read_state(spec, key="--weights", with_masks=with_masks)
    if is_hub_name(spec):
        source = label = str(hub_enum(spec, with_masks, "--weights"))
    else:
        source, label = display_path(Path(spec).expanduser()), Path(spec).name
    iteration = ckpt.iteration_of(Path(spec)) or 0  # an rcnn-lab checkpoint file (iter_0000200.pt): its step
    return Weights("--weights", source, identity, label, state, iteration)


def eval_hash(run_hash: str, identity: str) -> str:
    """The hash of an evaluation: the evaluated config's hash and the weights' identity."""
    blob = json.dumps({"kind": tags.EVAL_RUN, "config": run_hash, "weights": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_eval_plan(exp: Experiment, variants: list[str] | None, weights: Weights) -> list[PlannedRun]:
    """One evaluation per chosen variant (all by default), with the seed of ``--run``'s run, else the first seed."""
    seed = weights.seed if weights.seed is not None else exp.seeds[0]
    return [replace(r, hash=eval_hash(r.hash, weights.identity))
            for r in make_plan(exp, variants, seeds=[seed])]


def check_fit(plan: list[PlannedRun], weights: Weights) -> None:
    """Every tensor of every planned model must come from ``weights`` (checked on the meta device: no memory)."""
    from rcnn_lab.engine.weights import load_into, whole
    from rcnn_lab.models.builder import build_for_weights

    problems: list[Problem] = []
    for run in plan:
        with torch.device("meta"):
            model = build_for_weights(run.config.model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op": the point here
                report = load_into(model, weights.state, source=weights.source, identity=weights.identity,
                                   key=weights.flag)
        except ConfigError as exc:
            problems += [Problem(p.path, f"variant {run.variant.name}: {p.message}", p.file) for p in exc.problems]
            continue
        if not whole(model, report):
            problems.append(Problem(weights.flag, f"{weights.source} does not fit variant {run.variant.name}'s model "
                                    f"({report.summary()}); an evaluation needs every tensor from the weights: give the "
                                    "experiment (and --variant) they were trained with, or set model.num_classes and "
                                    "the architecture to theirs"))
    if problems:
        raise ConfigError(list({str(p): p for p in problems}.values()))


def evaluate_plan(exp: Experiment, plan: list[PlannedRun], weights: Weights, inputs: dict, *, force: bool = False,
                  root: Path | None = None, progress: bool = True, echo=print) -> list[Outcome]:
    """Evaluate every planned run (``inputs``: ``preflight.prepare_eval(plan)``) and record it in MLflow."""
    uri = tr.resolve_uri(exp.tracking.uri, root)
    c = tr.client(uri)  # an unreachable store fails here, before any evaluation
    root = Path(root) if root is not None else tr.runs_root(uri)
    exp_id = tr.experiment_id(c, exp.tracking_name, tr.default_artifact_root(uri, root))
    common = tr.common_tags(exp, 1)
    outcomes: list[Outcome] = []
    run = None
    try:
        for run in plan:
            outcomes.append(_evaluate_planned(c, exp_id, exp, run, weights, inputs[run.hash], root, common, force,
                                              progress, echo))
    except Exception as exc:
        if not tr.unreachable(exc):
            raise
        raise tr.TrackingError(f"tracking store {uri} stopped answering ({tr.failure_reason(exc)}) before "
                               f"{run.label if run else 'the first evaluation'}; run the same command again once it "
                               "answers (finished evaluations are skipped)") from None
    if any(o.action == Action.RUN for o in outcomes) and not any(o.unstored for o in outcomes):
        echo(f"tracked in {uri}: experiment {exp.tracking_name!r} (rcnn-lab report {display_path(exp.path)} to compare)")
    return outcomes


def _evaluate_planned(c, exp_id: str, exp: Experiment, run: PlannedRun, weights: Weights, run_inputs, root: Path,
                      common: dict, force: bool, progress: bool, echo) -> Outcome:
    """Skip ``run`` (finished, or evaluated by a live process) or evaluate it in a new MLflow run."""
    from rcnn_lab.runner.sweep import decide

    out = output_dir(root, exp, run)
    stored = journal.replay(c, journal.folder(out))  # what an earlier invocation could not store
    if stored is not None and stored.unstored:
        echo(f"stored {run.label}: {stored.describe()} that an earlier invocation could not store (run {stored.run_id})")
    action, existing = decide(c, exp_id, run, force)
    if action == Action.SKIP:
        echo(f"skip   {run.label} ({run.hash}): finished evaluation {existing.info.run_id} (--force evaluates again)")
        return Outcome(run, Status.SKIPPED, action, tr.final_metrics(existing), run_id=existing.info.run_id)
    if action == Action.BUSY:
        echo(f"skip   {run.label} ({run.hash}): being evaluated by another process ({existing.info.run_id})")
        return Outcome(run, Status.RUNNING_ELSEWHERE, action, run_id=existing.info.run_id)
    if action == Action.RESUME and existing.info.status == "RUNNING":  # its process is gone: an evaluation restarts
        c.set_terminated(existing.info.run_id, Status.KILLED.value)
        echo(f"marked KILLED: evaluation {existing.info.run_id} (its process is gone)")
    run_id = _start(c, exp_id, exp, run, weights, run_inputs.device, common)
    if out.exists():
        shutil.rmtree(out)  # an evaluation starts from nothing
    echo(f"eval   {run.label} ({run.hash}) as run {run_id}: {weights.source}")
    with tr.Heartbeat(c, run_id):
        return _evaluate_one(c, run_id, run, out, weights, run_inputs, progress=progress, echo=echo)


def _start(c, exp_id: str, exp: Experiment, run: PlannedRun, weights: Weights, device, common: dict) -> str:
    from rcnn_lab.config.loader import flatten
    from rcnn_lab.config.types import to_plain
    from rcnn_lab.engine.device import device_name
    from rcnn_lab.runner.sweep import command_line_keys

    run_tags = {
        **common, **tr.claim_tags(), tags.KIND: tags.EVAL_RUN, tags.VARIANT: run.variant.name,
        tags.SEED: str(run.seed), tags.CONFIG_HASH: run.hash, tags.BASELINE: str(run.variant.baseline).lower(),
        tags.DEVICE: str(device), tags.DEVICE_NAME: device_name(device), tags.THREADS: str(torch.get_num_threads()),
        tags.CHANGED: json.dumps(run.variant.changed)[:5000], tags.OVERRIDES: json.dumps(command_line_keys(run.variant))[:5000],
        tags.WEIGHTS_IDENTITY: weights.identity[:5000], tags.WEIGHTS_SOURCE: weights.label[:5000],
    }
    if weights.run_id:
        run_tags[tags.EVALUATED_RUN] = weights.run_id
    r = c.create_run(exp_id, run_name=f"eval {run.variant.name} ({weights.label})"[:250], tags=run_tags)
    params = tr.flatten_params(flatten(to_plain(run.config)))
    for i in range(0, len(params), 100):
        c.log_batch(r.info.run_id, params=params[i:i + 100])
    c.log_text(r.info.run_id, yaml.safe_dump(to_plain(run.config), sort_keys=False), "config.yaml")
    return r.info.run_id


def _evaluate_one(c, run_id: str, run: PlannedRun, out: Path, weights: Weights, inputs, *, progress: bool,
                  echo) -> Outcome:
    """Build the variant's model, load the weights, evaluate, and log it all through the run's journal."""
    from rcnn_lab.engine.evaluator import Evaluator
    from rcnn_lab.engine.hooks import Periods
    from rcnn_lab.engine.trainer import resolve_amp, seed_everything
    from rcnn_lab.engine.weights import load
    from rcnn_lab.models.builder import build_for_weights
    from rcnn_lab.runner.hooks import GalleryHook, MLflowHook
    from rcnn_lab.runner.inputs import describe

    started = time.perf_counter()
    cfg = run.config
    j = journal.Journal(c, run_id, journal.folder(out), max_bytes=cfg.tracking.outage_buffer_mb * journal.MIB)
    try:
        seed_everything(cfg.train.seed)
        model = build_for_weights(cfg.model)  # the backbone's own weights are not read: every tensor is replaced
        # torchvision's COCO weights: class rows by category id, put in data.val's label order first
        report = load(model, weights.state, source=weights.source, identity=weights.identity,
                      categories=inputs.val_set.categories, key=weights.flag)
        if report.reordered:
            echo(f"       {run.label}: {weights.label}'s class rows are COCO category ids: reordered to data.val's labels")
        artifacts.log_weights(j, report)
        j.text(artifacts.model_summary(model), "model_summary.txt")
        j.inputs([{**describe(cfg.data.val, inputs.val_set, "val"), "context": "validation"}])
        logger = MLflowHook(j, 1, Periods.of(cfg.train), cfg.tracking.async_logging)  # as a trained run logs them
        hooks = [GalleryHook(j, cfg.eval.gallery)] if cfg.eval.gallery else []
        evaluator = Evaluator(cfg, model, inputs.device, inputs.val_set, weights.iteration,
                              resolve_amp(cfg.train.amp, inputs.device), [*hooks, logger], progress)
        result = evaluator.evaluate()  # the hooks log the metrics at the weights' iteration and draw the gallery
        metrics = {**result.metrics, **artifacts.model_cost(evaluator.model, inputs.val_set, inputs.device)}
        logger.log_final(metrics, weights.iteration)
        artifacts.log_evaluation(j, evaluator, metrics, result.per_class, weights.iteration, out)
        j.end(Status.FINISHED.value)
        status, error = Status.FINISHED, None
    except KeyboardInterrupt:
        j.end(Status.KILLED.value)
        _close(j, echo)
        raise
    except Exception as exc:  # recorded, not swallowed: tag + artifact, and the next variant goes on
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        j.tags({tags.ERROR: error})
        j.text(traceback.format_exc(), "error.txt")
        j.end(Status.FAILED.value)
        echo(f"FAILED {run.label}: {error}")
        metrics, status = {}, Status.FAILED
    unstored = _close(j, echo)
    return Outcome(run, status, Action.RUN, metrics, time.perf_counter() - started, run_id, error, unstored)


def _close(j: journal.Journal, echo) -> bool:
    """Let the run's writes reach the store (at most OUTAGE_WAIT_S of an outage); True when some are left on disk."""
    b = j.close(OUTAGE_WAIT_S)
    if b.unstored:
        echo(f"tracking store unreachable ({b.outage or 'no answer'}): not stored for run {b.run_id}: {b.describe()}; "
             "kept on disk; run the same `rcnn-lab eval` again once the store answers: it stores them first")
    return b.unstored
