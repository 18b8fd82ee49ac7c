"""Hooks: the few stages where tracking, probes and progress plug into the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field


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


class Hook:
    """Override any of these; every stage receives the trainer."""

    def before_train(self, trainer) -> None: ...

    def after_step(self, trainer, record: StepRecord) -> None: ...

    def after_eval(self, trainer, iteration: int, metrics: dict[str, float], per_class: dict) -> None: ...

    def after_checkpoint(self, trainer, iteration: int, path) -> None: ...

    def after_train(self, trainer, result) -> None: ...


class Hooks(Hook):
    """Calls every hook in order."""

    def __init__(self, hooks=()):
        self.hooks = list(hooks)

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
    """A tqdm bar with the losses and ETA; plain log lines every ``train.log_every`` iterations."""

    def __init__(self, enabled: bool = True, desc: str = "train"):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def before_train(self, trainer):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.config.train.iterations, initial=trainer.start_iteration,
                            desc=self.desc, dynamic_ncols=True, leave=False)

    def after_step(self, trainer, record):
        if self.bar is not None:
            self.bar.update(1)
            if record.iteration % trainer.config.train.log_every == 0 or record.iteration == 1:
                short = {k.replace("loss_", ""): f"{v:.3f}" for k, v in record.losses.items()}
                self.bar.set_postfix(total=f"{record.total:.3f}", **short)

    def after_train(self, trainer, result):
        if self.bar is not None:
            self.bar.close()
