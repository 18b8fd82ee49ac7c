"""Hooks: called by priority; periods kept by the hook; ProgressHook's bar on terminals, plain lines elsewhere."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rcnn_lab.engine.hooks import Hook, Hooks, Periods, Priority, ProgressHook, StepRecord

LOSSES = {"loss_classifier": 0.5, "loss_box_reg": 0.25, "loss_mask": 0.125, "loss_objectness": 0.0625, "loss_rpn_box_reg": 0.03125}


def progress(iterations: int, log_every: int, start: int = 0, **kwargs):
    """A ProgressHook built with its periods, and the trainer state it reads (where training starts)."""
    return ProgressHook(Periods(iterations, log_every), bar=False, **kwargs), SimpleNamespace(start_iteration=start)


def record(it: int) -> StepRecord:
    return StepRecord(it, dict(LOSSES), lr=0.002, data_time=0.004, step_time=0.5, peak_memory_mb=2048.0, images=4)


def test_plain_lines_every_log_every_and_at_the_end():
    out = io.StringIO()
    hook, trainer = progress(iterations=7, log_every=3, desc="detach seed=1", stream=out)
    hook.before_train(trainer)
    for it in range(1, 8):
        hook.after_step(trainer, record(it))
    lines = out.getvalue().splitlines()
    assert [line.split()[3] for line in lines] == ["3/7", "6/7", "7/7"]
    first = lines[0]
    assert first.startswith("detach seed=1 iter 3/7")
    assert f"loss {sum(LOSSES.values()):.3f}" in first
    for part in ("classifier 0.500", "box_reg 0.250", "mask 0.125", "objectness 0.062", "rpn_box_reg 0.031",
                 "lr 0.002", "data 4ms", "step 500ms", "mem 2048MB", "eta "):
        assert part in first, part


def test_resumed_run_counts_from_its_start_and_lines_can_be_silenced():
    out = io.StringIO()
    hook, trainer = progress(iterations=10, log_every=5, start=5, stream=out)
    hook.before_train(trainer)
    for it in range(6, 11):
        hook.after_step(trainer, record(it))
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["10/10"]
    quiet = io.StringIO()
    silent, _ = progress(iterations=10, log_every=5, lines=False, stream=quiet)
    silent.before_train(trainer)
    silent.after_step(trainer, record(10))
    assert quiet.getvalue() == ""


def test_each_evaluation_prints_one_line_with_ap_and_ap50():
    out = io.StringIO()
    hook, trainer = progress(iterations=10, log_every=5, desc="quick seed=0", stream=out)
    hook.before_train(trainer)
    metrics = {"bbox_AP": 0.25, "bbox_AP50": 0.5, "segm_AP": 0.125, "segm_AP50": 0.375, "segm_agnostic_AP50": 0.75}
    hook.after_eval(trainer, 400, metrics, {})
    assert out.getvalue() == ("quick seed=0 eval @400  bbox AP 0.250 AP50 0.500  "
                              "segm AP 0.125 AP50 0.375 (agnostic 0.750)\n")
    quiet = io.StringIO()
    silent, _ = progress(iterations=10, log_every=5, lines=False, stream=quiet)
    silent.after_eval(trainer, 400, metrics, {})
    assert quiet.getvalue() == ""


def test_hooks_run_by_priority_then_in_the_order_given():
    calls = []

    class Named(Hook):
        def __init__(self, name, priority):
            self.name, self.priority = name, priority

        def after_step(self, trainer, record):
            calls.append(self.name)

    given = [Named("log", Priority.LOG), Named("a", Priority.NORMAL), Named("probe", Priority.MEASURE),
             Named("b", Priority.NORMAL)]
    Hooks(given).after_step(None, record(1))
    assert calls == ["probe", "a", "b", "log"]


def test_periods_name_the_steps_that_log_checkpoint_and_evaluate():
    p = Periods(iterations=10, log_every=4, checkpoint_every=3, eval_every=5)
    steps = range(1, 11)
    assert [s for s in steps if p.logs_after(s)] == [4, 8, 10]
    assert [s for s in steps if p.checkpoints_after(s)] == [3, 6, 9, 10]
    assert [s for s in steps if p.evaluates_after(s)] == [5]  # the last step's evaluation is the final one
    assert [s for s in steps if Periods(10, 4).checkpoints_after(s)] == [10]
