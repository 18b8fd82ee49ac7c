"""``MLflowHook``: batched logging through the run's journal, on disk before every checkpoint (real sqlite store)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rcnn_lab.engine.hooks import Periods, StepRecord
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.hooks import MLflowHook
from rcnn_lab.runner.journal import Journal

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _record(it: int) -> StepRecord:
    return StepRecord(it, {"loss_classifier": 1.0 / it, "loss_mask": 0.5}, 0.01, 0.001, 0.1, 10.0, 2)


def _journaled_steps(journal: Journal, key: str = "loss") -> list[int]:
    import json

    lines = (journal.folder / "journal.jsonl").read_text().splitlines()
    return [p[3] for line in lines for p in json.loads(line).get("m", []) if p[0] == key]


def test_metrics_are_journaled_before_each_checkpoint_and_batched_between(tmp_path, new_store):
    c = tr.client(new_store(tmp_path))
    run_id = c.create_run(tr.experiment_id(c, "hooks", (tmp_path / "a").as_uri())).info.run_id
    journal = Journal(c, run_id, tmp_path / "tracking", start=False)  # stored only when the test drains it
    trainer = SimpleNamespace()  # the hook keeps its own periods: checkpoints after step 4 and the last step (10)
    hook = MLflowHook(journal, every=100, periods=Periods(iterations=10, checkpoint_every=4), asynchronous=True)
    for it in range(1, 5):
        hook.after_step(trainer, _record(it))
    # step 4 precedes a checkpoint: everything up to it is on disk now, nothing left buffered
    assert _journaled_steps(journal) == [1, 2, 3, 4] and hook.buffer == []
    assert c.get_metric_history(run_id, "loss") == []  # the store is written by the shipper, not the training thread
    hook.after_step(trainer, _record(5))  # an ordinary step: buffered, not journaled (every=100)
    assert _journaled_steps(journal) == [1, 2, 3, 4] and hook.buffer
    journal.drain()
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert c.get_metric_history(run_id, "loss_classifier")[-1].value == 0.25
    hook.after_train(trainer, None)
    journal.drain()
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert {"images_per_s", "lr", "step_time_s", "peak_memory_mb"} <= set(c.get_run(run_id).data.metrics)


def test_a_resumed_run_does_not_log_the_replayed_steps_twice(tmp_path, new_store):
    c = tr.client(new_store(tmp_path))
    run_id = c.create_run(tr.experiment_id(c, "hooks", (tmp_path / "a").as_uri())).info.run_id
    periods = Periods(iterations=6, checkpoint_every=2)
    first_journal = Journal(c, run_id, tmp_path / "first")
    first = MLflowHook(first_journal, every=1, periods=periods, asynchronous=False)
    first.before_train(SimpleNamespace(start_iteration=0))
    for it in range(1, 4):  # checkpoint at 2, step 3 logged, then kill -9
        first.after_step(SimpleNamespace(), _record(it))
    first.after_eval(None, 3, {"bbox_AP": 0.1}, {})
    assert first_journal.close(5).unstored is False
    resumed_journal = Journal(c, run_id, tmp_path / "resumed")
    resumed = MLflowHook(resumed_journal, every=1, periods=periods, asynchronous=False)
    resumed.before_train(SimpleNamespace(start_iteration=2))  # from the checkpoint at 2
    for it in range(3, 7):
        resumed.after_step(SimpleNamespace(), _record(it))
    resumed.after_eval(None, 3, {"bbox_AP": 0.1}, {})
    resumed.after_eval(None, 6, {"bbox_AP": 0.2}, {})
    resumed.after_train(None, None)
    assert resumed_journal.close(5).unstored is False
    assert sorted(m.step for m in c.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in c.get_metric_history(run_id, "loss_mask")) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in c.get_metric_history(run_id, "bbox_AP")) == [3, 6]


def test_an_epoch_run_journals_its_last_steps_before_its_last_checkpoint(tmp_path, new_store):
    """``train.epochs`` runs know their length only once the trainer has loaded the data: the hook takes the trainer's periods."""
    c = tr.client(new_store(tmp_path))
    run_id = c.create_run(tr.experiment_id(c, "hooks", (tmp_path / "a").as_uri())).info.run_id
    journal = Journal(c, run_id, tmp_path / "tracking", start=False)
    hook = MLflowHook(journal, every=100, periods=Periods(iterations=0))  # what the config alone says (epochs: unknown)
    trainer = SimpleNamespace(start_iteration=0, periods=Periods(iterations=6))
    hook.before_train(trainer)
    for it in range(1, 7):
        hook.after_step(trainer, _record(it))
    assert _journaled_steps(journal) == [1, 2, 3, 4, 5, 6] and hook.buffer == []  # step 6 precedes the last checkpoint
    journal.close(0)


def test_cocoeval_minus_one_for_an_empty_size_range_is_not_logged():
    from rcnn_lab.runner.hooks import defined

    metrics = {"bbox_AP": 0.5, "bbox_APl": -1.0, "segm_ARs": -1.0, "segm_APs": 0.0, "eval_time_s": 2.0}
    assert defined(metrics) == {"bbox_AP": 0.5, "segm_APs": 0.0, "eval_time_s": 2.0}  # a true 0 stays
