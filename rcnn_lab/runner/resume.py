"""Before a sweep: the checkpoint of every run it would resume is checked, so a bad one is one line, not a FAILED run.

A run is resumed (``runner.sweep.decide``) from the newest checkpoint in its output folder. When that
file is empty, truncated, not an rcnn-lab checkpoint, or claims an iteration past the run's end
(``engine.checkpoint.check``), :func:`check_resumes` refuses the whole command (exit 2, one line per
run naming the file) before any run or sweep record is written, unless ``restart`` is given
(``rcnn-lab run --restart``): then the interrupted MLflow run is recorded FAILED with the reason, its
checkpoints are deleted, and the sweep trains the config afresh in a new run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rcnn_lab.config.loader import Experiment
from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.outcome import Action, Status
from rcnn_lab.runner.plan import PlannedRun, output_dir

RESTART_FIX = "rerun with --restart to train this run afresh (its checkpoints are deleted), or delete the file"


def total_iterations(run: PlannedRun, inputs=None, world_size: int = 1) -> int | None:
    """The run's length in iterations (as the trainer counts it); None for ``train.epochs`` without its dataset.

    With ``data.sampler: per_process`` each of ``world_size`` ranks draws its own batches: the longest rank's count.
    """
    t, d = run.config.train, run.config.data
    if t.iterations is not None:
        return t.iterations
    train_set = getattr(inputs, "train_set", None) if inputs is not None else None
    if train_set is None:
        return None
    from rcnn_lab.data.loader import batch_schedule

    per_process = d.sampler == "per_process" and world_size > 1
    ranks = range(world_size) if per_process else range(1)
    return t.epochs * max(batch_schedule(train_set, d.batch_size, True, d.group_aspect_ratio, d.aspect_ratio_group_factor,
                                         t.seed, True, per_process, rank, world_size).batches_per_epoch for rank in ranks)


def check_resumes(exp: Experiment, plan: list[PlannedRun], *, force: bool = False, restart: bool = False,
                  inputs: dict | None = None, root: Path | None = None, dry_run: bool = False, world_size: int = 1,
                  echo=print) -> list[str]:
    """Check the checkpoint of each run the sweep would resume; -> the labels of runs restarted.

    Read-only unless ``restart`` (and not ``dry_run``). Raises ``ConfigError`` (one line per bad
    checkpoint) when any is unusable and ``restart`` is not given.
    """
    if force:
        return []  # --force trains every run afresh
    uri = tr.resolve_uri(exp.tracking.uri, root)
    root = Path(root) if root is not None else tr.runs_root(uri)
    candidates = [(run, ckpt.latest(ckpt.folder(output_dir(root, exp, run)))) for run in plan]
    candidates = [(run, path) for run, path in candidates if path is not None]
    if not candidates or tr.local_store_missing(uri):
        return []
    from rcnn_lab.runner.sweep import decide

    c = tr.client(uri)
    e = c.get_experiment_by_name(exp.tracking_name)
    if e is None:
        return []
    bad: list[tuple[PlannedRun, object, Problem]] = []
    for run, path in candidates:
        action, existing = decide(c, e.experiment_id, run, force)
        if action != Action.RESUME:
            continue
        try:
            ckpt.check(path, total_iterations(run, (inputs or {}).get(run.hash), world_size))
        except ConfigError as exc:
            problem = exc.problems[0]
            bad.append((run, existing, Problem(problem.path, f"{problem.message} ({run.label}); {RESTART_FIX}",
                                               problem.file)))
    if not bad:
        return []
    if not restart:
        raise ConfigError([p for _, _, p in bad])
    restarted = []
    for run, existing, problem in bad:
        if not dry_run:
            reason = problem.message.split(f" ({run.label})")[0]
            c.set_tag(existing.info.run_id, tags.ERROR, f"not resumed (--restart): {problem.file}: {reason}"[:500])
            c.set_terminated(existing.info.run_id, Status.FAILED.value)
            shutil.rmtree(ckpt.folder(output_dir(root, exp, run)), ignore_errors=True)
            echo(f"restart {run.label}: {problem.file}: {reason}; run {existing.info.run_id} recorded FAILED")
        restarted.append(run.label)
    return restarted
