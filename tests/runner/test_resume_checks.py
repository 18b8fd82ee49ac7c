"""A checkpoint that cannot be resumed is one line before anything is written, or (--restart) the run starts over."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.runner import tags
from rcnn_lab.runner.plan import make_plan, output_dir
from rcnn_lab.runner.tracking import runs_root
from tests.runner.conftest import cli, tiny_experiment


def _interrupted(tmp_path, new_store, damage: str):
    """A store holding one KILLED run of the tiny experiment, whose output folder holds a damaged checkpoint."""
    uri = new_store(tmp_path)
    exp_path = tiny_experiment(tmp_path / "exp", uri, iterations=2)
    exp = load_experiment(exp_path)
    [planned] = make_plan(exp)
    c = MlflowClient(uri)
    exp_id = c.create_experiment(exp.tracking_name)
    killed = c.create_run(exp_id, tags={tags.CONFIG_HASH: planned.hash, tags.KIND: tags.VARIANT_RUN}).info.run_id
    c.set_terminated(killed, "KILLED")
    folder = ckpt.folder(output_dir(runs_root(uri), exp, planned))
    path = ckpt.path_for(folder, 1)
    if damage == "empty":
        folder.mkdir(parents=True)
        path.write_bytes(b"")
    elif damage == "truncated":
        ckpt.save(path, {"model": {"w": torch.zeros(1000)}, "optimizer": {}, "iteration": 1})
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "foreign":
        ckpt.save(path, {"state_dict": {"w": torch.zeros(3)}})
    else:  # a checkpoint of another, longer run
        path = ckpt.path_for(folder, 10**9)
        ckpt.save(path, {"model": {}, "optimizer": {}, "iteration": 10**9})
    return exp_path, c, exp_id, killed, path


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign", "past-the-end"])
def test_a_checkpoint_that_cannot_be_resumed_is_one_line_and_nothing_is_written(tmp_path, new_store, damage, dry_run):
    exp_path, c, exp_id, killed, path = _interrupted(tmp_path, new_store, damage)
    before = path.read_bytes()

    code, out, err = cli("run", str(exp_path), *(["--dry-run"] if dry_run else []))

    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert path.name in errors[0] and "--restart" in errors[0] and "b seed=0" in errors[0], errors[0]
    runs = c.search_runs([exp_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(killed, "KILLED")]  # no sweep run, no new run
    assert path.read_bytes() == before


def test_restart_records_the_interrupted_run_failed_and_trains_afresh(tmp_path, new_store):
    exp_path, c, exp_id, killed, path = _interrupted(tmp_path, new_store, "past-the-end")

    code, out, err = cli("run", str(exp_path), "--restart")

    assert code == 0, err
    old = c.get_run(killed)
    assert old.info.status == "FAILED" and path.name in old.data.tags[tags.ERROR] and "--restart" in old.data.tags[tags.ERROR]
    fresh = [r for r in c.search_runs([exp_id]) if r.data.tags.get(tags.KIND) == tags.VARIANT_RUN and r.info.run_id != killed]
    assert len(fresh) == 1 and fresh[0].info.status == "FINISHED"
    assert not path.exists() and [ckpt.iteration_of(p) for p in ckpt.saved(path.parent)] == [2]  # trained 2 iterations
    assert "restart b seed=0: " in out and path.name in out and f"run {killed} recorded FAILED" in out


def test_the_length_a_checkpoint_is_checked_against_is_the_trainers_under_per_process_sampling():
    """``data.sampler: per_process`` under N ranks: each rank draws its own share, so an epoch can hold more
    steps than the global schedule's; a checkpoint at the true end must not be refused as past it."""
    from types import SimpleNamespace

    from rcnn_lab.data.loader import batch_schedule
    from rcnn_lab.runner.resume import total_iterations
    from tests.data.test_loader import Toy

    ds = Toy([1.0, 0.5, 2.0, 0.75, 1.5, 1.0, 0.5, 1.33, 0.8, 1.0, 0.6])  # 11 images
    data = SimpleNamespace(sampler="per_process", batch_size=4, group_aspect_ratio=True, aspect_ratio_group_factor=3)
    run = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(iterations=None, epochs=2, seed=0), data=data))
    inputs = SimpleNamespace(train_set=ds)
    per_rank = [batch_schedule(ds, 4, True, True, 3, 0, True, True, rank, 2).batches_per_epoch for rank in range(2)]
    global_ = batch_schedule(ds, 4, True, True, 3, 0, True).batches_per_epoch
    assert total_iterations(run, inputs, world_size=2) == 2 * max(per_rank)
    assert total_iterations(run, inputs, world_size=1) == 2 * global_
    assert max(per_rank) > global_  # the case that was refused: the per-rank epoch is longer
