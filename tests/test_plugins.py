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
        name, value = "extra_heads", "my_pkg.heads:register"

        def load(self):
            return lambda: called.append(True)

    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.setattr(plugins, "_entry_points", [])
    monkeypatch.setattr(md, "entry_points", lambda group: [EP()] if group == plugins.ENTRY_POINT_GROUP else [])
    assert plugins.load_entry_points() == ["entry point extra_heads (my_pkg.heads:register)"]
    assert called == [True]


MARKER_PLUGIN = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"], ["components"]])
def test_registry_folders_outside_the_project_never_run(tmp_path, monkeypatch, command):
    from rcnn_lab.cli.main import main

    shared = tmp_path / "shared"  # e.g. a temp folder anyone can write to
    marker = tmp_path / "ran.txt"
    for folder in (shared / "registry", shared / "work" / "registry"):  # an ancestor of the file, and the cwd
        folder.mkdir(parents=True)
        (folder / "evil.py").write_text(MARKER_PLUGIN.format(marker=str(marker)))
    exp = shared / "work" / "exps" / "exp.yaml"
    exp.parent.mkdir(parents=True)
    exp.write_text(f"base: {EXPERIMENTS / 'base.yaml'}\nname: p\n")
    monkeypatch.chdir(shared / "work")
    argv = command if command == ["components"] else [command[0], str(exp), *command[1:]]
    assert main(argv) == 0
    assert not marker.exists()


def test_loaded_plugin_files_are_listed_and_printed(tmp_path, capsys, write_yaml, monkeypatch):
    from rcnn_lab.cli.main import main

    monkeypatch.chdir(tmp_path.parent)

    write_yaml("mine.py", "X = 1\n")
    path = write_yaml("exp.yaml", f"base: {EXPERIMENTS / 'base.yaml'}\nname: p\nplugins: [mine.py]\n")
    exp = load_experiment(path, check_models=False)
    registry = ROOT / "registry" / "light_mask_head.py"  # the project's own registry/, wherever the experiment is
    assert exp.plugin_files[:2] == [str(registry), f"{tmp_path.name}/mine.py"]
    assert main(["validate", str(path)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("plugins: ")]
    assert str(registry) in line and "mine.py" in line
