"""engine/preflight.py: what loading an experiment checks, and what it builds to check it."""

from __future__ import annotations

import torch

from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.models import builder
from tests.conftest import EXPERIMENTS


def test_a_variant_with_weights_builds_its_model_once_to_check_both(tmp_path, monkeypatch):
    """The meta-device model that checks the variant's config also checks that ``model.weights`` fit it (a 200-variant
    experiment built each model twice before: 0.07 s per ResNet-50)."""
    quick = EXPERIMENTS / "quickstart.yaml"
    model = load_experiment(quick).variants[0].config.model
    path = tmp_path / "own.pth"
    torch.save(builder.build_model(model).state_dict(), path)
    built, real = [], builder.build_model
    monkeypatch.setattr(builder, "build_model", lambda cfg, *a, **k: built.append(cfg) or real(cfg, *a, **k))
    exp = load_experiment(quick, [f"model.weights={path}"])
    assert len(exp.variants) == 1 and len(built) == 1 and built[0].backbone == model.backbone
