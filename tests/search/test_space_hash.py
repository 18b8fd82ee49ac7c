"""A trial's run has the hash a variant of the same config has (``runner.plan.make_plan``): ``model.weights``
counted by its identity (the file's content), not by the path as written."""

from __future__ import annotations

import shutil

import torch

from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.runner.plan import make_plan
from rcnn_lab.search.space import trial_run
from tests.search.conftest import search_experiment

SPACE = "search:\n  space:\n    train.optimizer.lr: {float: [0.001, 0.01]}\n  objective: {bbox_AP: max}\n"


def test_a_trial_with_the_baselines_values_is_the_baselines_run(tmp_path):
    from rcnn_lab.models.builder import build_model

    path = search_experiment(tmp_path, space=SPACE)
    weights = tmp_path / "w.pth"  # weights of the tiny model (weights that do not fit it are refused at load)
    torch.save(build_model(load_experiment(path).variants[0].config.model).state_dict(), weights)
    copy = tmp_path / "elsewhere" / "renamed.pth"
    copy.parent.mkdir()
    shutil.copyfile(weights, copy)
    exp = load_experiment(path, [f"model.weights={weights}"])
    (baseline,) = make_plan(exp)
    assert trial_run(exp, 0, {"train.optimizer.lr": 0.01}).hash == baseline.hash  # the tiny experiment's lr
    assert trial_run(load_experiment(path, [f"model.weights={copy}"]), 0, {"train.optimizer.lr": 0.01}).hash == baseline.hash
    assert trial_run(exp, 1, {"train.optimizer.lr": 0.002}).hash != baseline.hash
