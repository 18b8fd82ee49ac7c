"""What happened to each planned run: a typed status and the action that led to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from rcnn_lab.runner.plan import PlannedRun


class _Text(str, Enum):
    """An enum whose members print, format and compare as their text."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Status(_Text):
    """Where a planned run stands after an invocation (MLflow's run statuses, plus four of ours)."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    SKIPPED = "SKIPPED"  # a finished run of the same config exists (``--force`` reruns it)
    RUNNING_ELSEWHERE = "RUNNING-ELSEWHERE"  # another worker holds a live claim on it
    PLANNED = "PLANNED"  # no run of it exists yet
    STOPPED = "STOPPED"  # ended early by a hook (``engine.hooks.StopTraining``): KILLED in MLflow, resumable


class Action(_Text):
    """What the runner decides for a planned run (``runner.sweep.decide``)."""

    RUN = "run"  # a fresh run
    RESUME = "resume"  # continue an interrupted run from its last checkpoint
    SKIP = "skip"  # finished already
    BUSY = "busy"  # another live worker trains it
    NONE = "none"  # nothing known (read back from the store without a run)


@dataclass
class Outcome:
    run: PlannedRun
    status: Status
    action: Action
    metrics: dict = field(default_factory=dict)
    duration_s: float = 0.0
    run_id: str | None = None
    error: str | None = None
    unstored: bool = False  # some of its tracking writes are still on disk only (the store stopped answering)
