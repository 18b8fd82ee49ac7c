"""Hooks: the few stages where tracking, probes and progress plug into the training loop.

A hook is built with the periods it keeps (:class:`Periods`, from ``train:``) and declares a
:class:`Priority`; :class:`Hooks` calls them in priority order (then in the order given), so that
a hook that adds to the step record (the gradient probe) runs before one that sends it away (MLflow).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from enum import IntEnum


@dataclass
class StepRecord:
    """What one training iteration produced (floats, already on the host)."""

    iteration: int  # 1-based count of finished iterations
    losses: dict[str, float]
    lr: float
    data_time: float
    step_time: float
    peak_memory_mb: float
    images: int
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.losses.values())


@dataclass(frozen=True)
class Periods:
    """The step schedule of a run, in iterations (``train:``); 0 disables a period."""

    iterations: int
    log_every: int = 20
    checkpoint_every: int = 0
    eval_every: int = 0

    @classmethod
    def of(cls, train, iterations: int | None = None) -> Periods:
        """The periods of a ``TrainConfig``; ``iterations``: the run's length when ``train.epochs`` sets it."""
        length = iterations if iterations is not None else train.iterations
        return cls(length if length is not None else 0, train.log_every, train.checkpoint_every, train.eval_every)

    def logs_after(self, step: int) -> bool:
        """A history/log line after ``step``: every ``log_every`` and at the last step."""
        return step % self.log_every == 0 or step == self.iterations

    def checkpoints_after(self, step: int) -> bool:
        """The trainer writes a checkpoint after ``step``: every ``checkpoint_every`` and at the last step."""
        return step == self.iterations or bool(self.checkpoint_every and step % self.checkpoint_every == 0)

    def evaluates_after(self, step: int) -> bool:
        """An evaluation during training after ``step`` (the final one after the last step is always run)."""
        return bool(self.eval_every and step % self.eval_every == 0 and step < self.iterations)


class StopTraining(Exception):
    """Raised by a hook to end a run early (e.g. a pruner's decision at an evaluation): the runner records
    the run KILLED with the iteration it reached and keeps its checkpoint, so that rerunning it resumes."""

    def __init__(self, iteration: int, reason: str):
        super().__init__(f"stopped at iteration {iteration}: {reason}")
        self.iteration, self.reason = iteration, reason


class Priority(IntEnum):
    """When a hook runs at each stage, lowest first."""

    MEASURE = 10  # adds to the step record (``record.extra``): the gradient probe
    NORMAL = 50  # reads the record: progress, user hooks
    LOG = 90  # sends the record away (MLflow), after every hook that adds to it


class Hook:
    """Override any of these; every stage receives the trainer."""

    priority: int = Priority.NORMAL

    def before_train(self, trainer) -> None: ...

    def after_step(self, trainer, record: StepRecord) -> None: ...

    def after_eval(self, trainer, iteration: int, metrics: dict[str, float], per_class: dict) -> None: ...

    def after_checkpoint(self, trainer, iteration: int, path) -> None: ...

    def after_train(self, trainer, result) -> None: ...


class Hooks(Hook):
    """Calls every hook by priority (stable: equal priorities keep the order given)."""

    def __init__(self, hooks=()):
        self.hooks = sorted(hooks, key=lambda h: h.priority)

    def before_train(self, trainer):
        for h in self.hooks:
            h.before_train(trainer)

    def after_step(self, trainer, record):
        for h in self.hooks:
            h.after_step(trainer, record)

    def after_eval(self, trainer, iteration, metrics, per_class):
        for h in self.hooks:
            h.after_eval(trainer, iteration, metrics, per_class)

    def after_checkpoint(self, trainer, iteration, path):
        for h in self.hooks:
            h.after_checkpoint(trainer, iteration, path)

    def after_train(self, trainer, result):
        for h in self.hooks:
            h.after_train(trainer, result)


class ProgressHook(Hook):
    """A tqdm bar with the losses and ETA on a terminal; otherwise (``bar=False``: logs, CI, array
    jobs) one plain line every ``periods.log_every`` iterations. ``lines=False`` silences both."""

    def __init__(self, periods: Periods, bar: bool = True, desc: str = "train", lines: bool = True, stream=None):
        self.periods, self.use_bar, self.desc, self.lines, self.stream, self.bar = periods, bar, desc, lines, stream, None
        self.started, self.first = 0.0, 0

    def before_train(self, trainer):
        self.started, self.first = time.perf_counter(), trainer.start_iteration
        self.periods = getattr(trainer, "periods", self.periods)  # a train.epochs run's length is known only now
        if self.use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.periods.iterations, initial=trainer.start_iteration,
                            desc=self.desc, dynamic_ncols=True, leave=False)

    def after_step(self, trainer, record):
        every, total = self.periods.log_every, self.periods.iterations
        if self.bar is not None:
            self.bar.update(1)
            if record.iteration % every == 0 or record.iteration == 1:
                short = {k.replace("loss_", ""): f"{v:.3f}" for k, v in record.losses.items()}
                self.bar.set_postfix(total=f"{record.total:.3f}", **short)
        elif self.lines and self.periods.logs_after(record.iteration):
            done = record.iteration - self.first
            eta = (time.perf_counter() - self.started) / max(done, 1) * (total - record.iteration)
            losses = " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in record.losses.items())
            print(f"{self.desc} iter {record.iteration}/{total}  loss {record.total:.3f} ({losses})  lr {record.lr:.3g}  "
                  f"data {record.data_time * 1e3:.0f}ms step {record.step_time * 1e3:.0f}ms  "
                  f"mem {record.peak_memory_mb:.0f}MB  eta {eta / 60:.1f}min", file=self.stream or sys.stderr, flush=True)

    def after_eval(self, trainer, iteration, metrics, per_class):
        """One line per evaluation: AP and AP50 per IoU type (and the class-agnostic AP50 when computed)."""
        if not self.lines and self.bar is None:
            return
        parts = []
        for t in ("bbox", "segm"):
            if f"{t}_AP" in metrics:
                agnostic = f" (agnostic {metrics[f'{t}_agnostic_AP50']:.3f})" if f"{t}_agnostic_AP50" in metrics else ""
                parts.append(f"{t} AP {metrics[f'{t}_AP']:.3f} AP50 {metrics[f'{t}_AP50']:.3f}{agnostic}")
        line = f"{self.desc} eval @{iteration}  " + "  ".join(parts)
        if self.bar is not None:
            self.bar.write(line, file=self.stream or sys.stderr)
        else:
            print(line, file=self.stream or sys.stderr, flush=True)

    def after_train(self, trainer, result):
        if self.bar is not None:
            self.bar.close()
