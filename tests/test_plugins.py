from __future__ import annotations

import pytest

from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.errors import ConfigError
from rcnn_lab.registry import BOX_HEADS, MASK_HEADS
from tests.conftest import EXPERIMENTS, ROOT


def test_registry_folder_plugin_is_loaded_and_usable():
    exp = load_experiment(EXPERIMENTS / "heads_ablation.yaml")
    assert "light_separable" in MASK_HEADS.names()
    light = [v for v in exp.variants if v.config.model.roi_heads.mask_head.type == "light_separable"]
    assert light, "heads_ablation.yaml should use the example plugin"
    from rcnn_lab.models.builder import build_model

    model = build_model(light[0].config.model)
    assert type(model.roi_heads.mask_head).__name__ == "SeparableMaskHead"
    assert (ROOT / "registry" / "light_mask_head.py").is_file()


def test_experiment_plugins_list_is_loaded_relative_to_the_file(tmp_path, write_yaml):
    write_yaml("my_heads.py", '''
from torch import nn
from rcnn_lab.registry import BOX_HEADS

@BOX_HEADS.register("tiny_fc_test_plugin")
def tiny_fc(in_channels: int, resolution: tuple[int, int], width: int = 8) -> nn.Module:
    """A single linear layer."""
    head = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * resolution[0] * resolution[1], width))
    head.out_channels = width
    return head
''')
    path = write_yaml("exp.yaml", f"""
base: {EXPERIMENTS / 'base.yaml'}
name: plug
plugins: [my_heads.py]
model: {{roi_heads: {{box_head: {{type: tiny_fc_test_plugin, width: 16}}}}}}
""")
    try:
        exp = load_experiment(path)
        assert exp.variants[0].config.model.roi_heads.box_head.kwargs == {"width": 16}
        bad = write_yaml("bad.yaml", path.read_text().replace("width: 16", "widht: 16"))
        with pytest.raises(ConfigError, match="did you mean 'width'"):
            load_experiment(bad)
    finally:
        BOX_HEADS.unregister("tiny_fc_test_plugin")


def test_missing_or_broken_plugin_file_is_a_config_error(write_yaml):
    write_yaml("broken.py", "raise RuntimeError('boom')\n")
    for plugin, words in (("nope.py", "not found"), ("broken.py", "failed to load: RuntimeError: boom")):
        path = write_yaml(f"exp_{plugin}.yaml", f"base: {EXPERIMENTS / 'base.yaml'}\nname: p\nplugins: [{plugin}]\n")
        with pytest.raises(ConfigError, match=words):
            load_experiment(path)


def test_entry_point_plugins_are_called(monkeypatch):
    import importlib.metadata as md

    import rcnn_lab.plugins as plugins

    called = []

    class EP:
        def load(self):
            return lambda: called.append(True)

    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.setattr(md, "entry_points", lambda group: [EP()] if group == plugins.ENTRY_POINT_GROUP else [])
    plugins.load_entry_points()
    assert called == [True]
