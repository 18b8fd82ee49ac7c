"""``rcnn-lab search --nproc N``: each trial (and the confirmation stage) trains on N local DDP ranks.

The search process stays the one that asks and tells Optuna; for a trial it launches N ranks of the
same command with ``--rank-of trial:NUMBER`` (``runner.launch``, as ``run --nproc`` does), which read
the trial's values from the study, build the same run (same config hash) and train it together
(rank 0 logs it under the search's parent run); the search process then reads the run's outcome from
the store and tells the trial. The confirmation stage is launched once with ``--rank-of confirm``:
every rank computes the same candidates from the study and trains them together. The pruner decides
in one process, so ``--nproc`` runs searches without one (``pruner: none``), refused otherwise.
"""

from __future__ import annotations

import time

from rcnn_lab.runner.outcome import Action, Outcome, Status
from rcnn_lab.runner.plan import PlannedRun

RANK_OF = "--rank-of"  # hidden flag of the ranks: trial:NUMBER or confirm
CONFIRM = "confirm"


def rank_argv(argv: list[str], target: str) -> list[str]:
    """The search's command line for its ranks: without --nproc / --export / --report, with ``--rank-of target``."""
    from rcnn_lab.runner.parallel import strip_option

    for flag in ("--nproc", "--export", "--report", RANK_OF):
        argv = strip_option(argv, flag)
    return [*argv, "--no-progress", RANK_OF, target]


def trainer(s, nproc: int, argv: list[str]):
    """``Search.train`` for ``--nproc``: (trial number, planned run) -> the run's outcome, read from the store."""
    from rcnn_lab.runner.launch import launch_local
    from rcnn_lab.runner.parallel import outcomes_from_store

    def train(number: int, run: PlannedRun) -> Outcome:
        started_ms = int(time.time() * 1000)
        code = launch_local(nproc, rank_argv(argv, f"trial:{number}"))
        (o,) = outcomes_from_store(s.client, s.exp_id, [run], started_ms)
        if code and o.status in (Status.PLANNED, Status.RUNNING_ELSEWHERE):
            return Outcome(run, Status.FAILED, Action.RUN, error=f"the {nproc} ranks exited with code {code}")
        return o

    return train


def confirm(nproc: int, argv: list[str]) -> int:
    from rcnn_lab.runner.launch import launch_local

    return launch_local(nproc, rank_argv(argv, CONFIRM))


def rank_main(s, target: str) -> int:
    """What one rank does: train trial NUMBER's run, or the confirmation stage, with the other ranks."""
    from rcnn_lab.runner.sweep import run_plan
    from rcnn_lab.search import confirm as stage
    from rcnn_lab.search import driver, space

    if target == CONFIRM:
        stage.run_confirmation(s, stage.candidates(s.exp, s.study))
        return 0
    number = int(target.split(":", 1)[1])
    t = s.study.trials[number]
    run = space.trial_run(s.exp, number, space.stored(s.exp.search.space, t.params))
    (o,) = run_plan(s.exp, [run], parent=s.parent, child_tags=driver.trial_tags(s, number), progress=False,
                    echo=s.echo, root=s.root)
    return 0 if o.status in (Status.FINISHED, Status.SKIPPED) else 1
