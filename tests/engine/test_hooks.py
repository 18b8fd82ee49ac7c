"""ProgressHook: a bar on terminals, plain log lines every ``train.log_every`` elsewhere."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rcnn_lab.engine.hooks import ProgressHook, StepRecord

LOSSES = {"loss_classifier": 0.5, "loss_box_reg": 0.25, "loss_mask": 0.125, "loss_objectness": 0.0625, "loss_rpn_box_reg": 0.03125}


def fake_trainer(iterations: int, log_every: int, start: int = 0):
    return SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(iterations=iterations, log_every=log_every)),
                           start_iteration=start)


def record(it: int) -> StepRecord:
    return StepRecord(it, dict(LOSSES), lr=0.002, data_time=0.004, step_time=0.5, peak_memory_mb=2048.0, images=4)


def test_plain_lines_every_log_every_and_at_the_end():
    out = io.StringIO()
    hook, trainer = ProgressHook(bar=False, desc="detach seed=1", stream=out), fake_trainer(iterations=7, log_every=3)
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
    hook, trainer = ProgressHook(bar=False, stream=out), fake_trainer(iterations=10, log_every=5, start=5)
    hook.before_train(trainer)
    for it in range(6, 11):
        hook.after_step(trainer, record(it))
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["10/10"]
    quiet = io.StringIO()
    silent = ProgressHook(bar=False, lines=False, stream=quiet)
    silent.before_train(trainer)
    silent.after_step(trainer, record(10))
    assert quiet.getvalue() == ""


def test_each_evaluation_prints_one_line_with_ap_and_ap50():
    out = io.StringIO()
    hook, trainer = ProgressHook(bar=False, desc="quick seed=0", stream=out), fake_trainer(iterations=10, log_every=5)
    hook.before_train(trainer)
    metrics = {"bbox_AP": 0.25, "bbox_AP50": 0.5, "segm_AP": 0.125, "segm_AP50": 0.375, "segm_agnostic_AP50": 0.75}
    hook.after_eval(trainer, 400, metrics, {})
    assert out.getvalue() == ("quick seed=0 eval @400  bbox AP 0.250 AP50 0.500  "
                              "segm AP 0.125 AP50 0.375 (agnostic 0.750)\n")
    quiet = io.StringIO()
    silent = ProgressHook(bar=False, lines=False, stream=quiet)
    silent.after_eval(trainer, 400, metrics, {})
    assert quiet.getvalue() == ""
