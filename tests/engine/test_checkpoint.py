"""Checkpoints: atomic writes, ``weights_only`` loading, one-line errors naming the file."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import torch
from torch import nn

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine.trainer import Trainer
from rcnn_lab.errors import ConfigError
from tests.engine.test_trainer import tiny_config


class Foreign:
    """An arbitrary Python object: not loadable with ``weights_only=True``."""

    def __init__(self):
        self.value = 3


def trainer_like_state(iteration: int = 7) -> dict:
    """What ``Trainer.state`` holds: model, optimizer (with momentum), scheduler, rng, history."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** it)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(), "iteration": iteration,
            "rng": ckpt.rng_state(), "history": [{"iteration": 1, "lr": 0.1, "loss_mask": 0.5}], "train_time_s": 1.5}


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_round_trip_with_weights_only(tmp_path, monkeypatch):
    state = trainer_like_state()
    path = tmp_path / "checkpoints" / "iter_0000007.pt"
    ckpt.save(path, state)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded = ckpt.load(path)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert_same(state, loaded)
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temp file left behind


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]


def test_failed_save_keeps_the_previous_file_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "iter_0000003.pt"
    ckpt.save(path, trainer_like_state(3))
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled
        ckpt.save(path, {**trainer_like_state(4), "bad": lambda: 0})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
    assert ckpt.load(path)["iteration"] == 3


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    path = tmp_path / "ckpt" / "iter_0000005.pt"
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(path, trainer_like_state(5))
    assert os.listdir(path.parent) == []


def _error(path) -> str:
    with pytest.raises(ConfigError) as info:
        ckpt.load(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    return text


def test_foreign_object_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({**trainer_like_state(), "extra": Foreign()}, path)
    text = _error(path)
    # the sentence that says why, not the first 100 characters of torch's advice paragraph
    assert "not a readable checkpoint (refused by torch.load(weights_only=True): " in text
    assert "Foreign" in text and "In PyTorch 2.6" not in text


def test_corrupt_archive_says_what_is_broken(tmp_path):
    path = tmp_path / "iter_0000003.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    text = _error(path)
    assert "failed finding central directory); delete it to start over" in text


def test_corrupted_file_names_the_file(tmp_path):
    path = ckpt.path_for(tmp_path, 2)
    ckpt.save(path, trainer_like_state(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated (e.g. a full disk under a non-atomic copy)
    assert "not a readable checkpoint" in _error(path) and "delete it" in _error(path)
    path.write_bytes(b"\x00garbage" * 100)
    assert "not a readable checkpoint" in _error(path)


def test_checkpoint_of_something_else_names_what_is_missing(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)  # plain weights, e.g. a torchvision download
    assert "not an rcnn-lab checkpoint (missing model, optimizer, iteration)" in _error(path)
    torch.save([1, 2], path)
    assert "missing model, optimizer, iteration" in _error(path)
    assert "checkpoint not found" in _error(tmp_path / "nope.pt")


def test_latest_picks_the_highest_iteration(tmp_path):
    assert ckpt.latest(tmp_path / "missing") is None
    for name in ("iter_0000009.pt", "iter_0000010.pt", "iter_final.pt", ".iter_0000011.pt.tmp-1", "other.pt"):
        (tmp_path / name).write_bytes(b"")
    assert ckpt.latest(tmp_path).name == "iter_0000010.pt"


def test_checkpoint_names_carry_their_iteration(tmp_path):
    folder = ckpt.folder(tmp_path / "out")
    assert folder.parent == tmp_path / "out"
    names = [ckpt.path_for(folder, it) for it in (10, 9, 200)]
    assert [ckpt.iteration_of(p) for p in names] == [10, 9, 200]
    assert ckpt.iteration_of(folder / "notes.pt") is None and ckpt.iteration_of(folder / "iter_x.pt") is None
    folder.mkdir(parents=True)
    for p in names:
        p.write_bytes(b"")
    assert ckpt.saved(folder) == [names[1], names[0], names[2]] and ckpt.latest(folder) == names[2]


def test_trainer_resume_from_corrupted_checkpoint_names_the_file(tmp_path):
    folder = ckpt.folder(tmp_path / "out")
    folder.mkdir(parents=True)
    ckpt.path_for(folder, 2).write_bytes(b"not a zip file")
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config(tmp_path), tmp_path / "out", resume=True)
    text = str(info.value)
    assert text.startswith(f"{ckpt.path_for(folder, 2)}: not a readable checkpoint") and "\n" not in text


@pytest.mark.parametrize("damage, expect", [
    ("empty", "checkpoint is empty"),
    ("truncated", "not a readable checkpoint"),
    ("foreign", "not an rcnn-lab checkpoint (missing model, optimizer, iteration)"),
    ("past-the-end", "claims iteration 1,000,000,000 but the run has 200"),
    ("wrong-name", "holds iteration 7 but its name says 100"),
    ("negative", "holds iteration -3, not a count"),
])
def test_check_refuses_a_checkpoint_that_cannot_be_resumed(tmp_path, damage, expect):
    folder = tmp_path / "checkpoints"
    state = trainer_like_state()
    path = ckpt.path_for(folder, 7)
    if damage == "empty":
        folder.mkdir()
        path.write_bytes(b"")
    elif damage == "truncated":
        ckpt.save(path, state)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "foreign":
        ckpt.save(path, {"weights": torch.zeros(2)})
    elif damage == "past-the-end":
        path = ckpt.path_for(folder, 10**9)
        ckpt.save(path, {**state, "iteration": 10**9})
    elif damage == "wrong-name":
        path = ckpt.path_for(folder, 100)
        ckpt.save(path, state)
    else:
        ckpt.save(path, {**state, "iteration": -3})
    with pytest.raises(ConfigError) as exc:
        ckpt.check(path, total_iterations=200)
    [problem] = exc.value.problems
    assert problem.file.endswith(path.name) and expect in problem.message, problem


def test_check_accepts_a_checkpoint_within_the_run(tmp_path):
    path = ckpt.path_for(tmp_path, 7)
    ckpt.save(path, trainer_like_state(7))
    ckpt.check(path, total_iterations=7)  # the last checkpoint of a finished run
    ckpt.check(path)  # an epoch-based run whose length is not known yet


def test_trainer_refuses_a_checkpoint_past_the_end_instead_of_finishing_untrained(tmp_path):
    out = tmp_path / "out"
    ckpt.save(ckpt.path_for(ckpt.folder(out), 10**9), {"model": {}, "optimizer": {}, "iteration": 10**9})
    with pytest.raises(ConfigError, match="claims iteration 1,000,000,000 but the run has 4"):
        Trainer(tiny_config(tmp_path), out)
