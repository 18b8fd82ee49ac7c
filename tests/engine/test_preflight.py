"""engine/preflight.py: what loading an experiment checks, and what it builds to check it."""

from __future__ import annotations

import pytest
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


def test_variants_that_share_a_weights_file_map_it_once_and_a_new_version_again(tmp_path, monkeypatch):
    from rcnn_lab.engine import weights as w
    from rcnn_lab.errors import ConfigError

    quick = EXPERIMENTS / "quickstart.yaml"
    path = tmp_path / "own.pth"
    torch.save(builder.build_model(load_experiment(quick).variants[0].config.model).state_dict(), path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {quick}\nmodel: {{weights: {path}}}\nvariants:\n  a: {{}}\n  b: {{model.rpn.nms_thresh: 0.6}}\n")
    reads, real = [], w._state_of
    monkeypatch.setattr(w, "_state_of", lambda *a, **k: reads.append(k.get("mmap")) or real(*a, **k))
    w._shapes.cache_clear()
    assert len(load_experiment(exp).variants) == 2 and reads == [True]  # mapped once for both variants
    torch.save({"other.weight": torch.zeros(3)}, path)  # the file replaced: read again, and refused
    with pytest.raises(ConfigError, match="own.pth does not fit this model: 0 of"):
        load_experiment(exp)
    assert reads == [True, True]
