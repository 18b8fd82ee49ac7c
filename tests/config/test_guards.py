"""Experiment-shape checks (config/guards.py) and the loader's use of them: seeds, override keys, variants x grid."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from rcnn_lab.config import loader
from rcnn_lab.config.guards import MAX_SEEDS, SECTIONS, check_seeds
from rcnn_lab.config.types import AsWritten
from rcnn_lab.errors import ConfigError
from rcnn_lab.runner.plan import make_plan

OK = "name: t\nmodel: {num_classes: 6}\n"


@pytest.fixture(autouse=True)
def _here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # errors name files relative to the working directory


def load(tmp_path: Path, text: str, overrides=(), files: dict[str, str] | None = None) -> loader.Experiment:
    for name, content in (files or {}).items():
        (tmp_path / name).write_text(content)
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return loader.load_experiment(path, list(overrides), families=AsWritten)


def error(tmp_path: Path, text: str, overrides=(), files=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text, overrides, files)
    assert len(exc.value.problems) == 1, exc.value.problems
    return str(exc.value.problems[0])


def test_set_train_seed_takes_effect_without_seeds(tmp_path):
    exp = load(tmp_path, OK, ["train.seed=7"])
    [run] = make_plan(exp)
    assert exp.seeds == [7] and run.seed == 7 and run.config.train.seed == 7
    assert run.hash != make_plan(load(tmp_path, OK))[0].hash  # seed 0 before the fix: the same run, silently
    assert load(tmp_path, OK + "train: {seed: 5}\n").seeds == [5]
    assert load(tmp_path, OK + "train: {seed: 5}\n", ["train={seed: 9}"]).seeds == [9]


def test_train_seed_beside_seeds_is_refused_on_the_command_line_and_warned_in_a_file(tmp_path):
    line = error(tmp_path, OK + "seeds: [0, 1]\n", ["train.seed=7"])
    assert line.startswith("--set: train.seed: ") and "seeds: [0, 1]" in line and "--seeds" in line
    exp = load(tmp_path, OK + "seeds: [0, 1]\ntrain: {seed: 3}\n")
    assert exp.seeds == [0, 1]
    assert [str(w) for w in exp.warnings] == ["exp.yaml: train.seed: is replaced by seeds: [0, 1]; remove it"]


def test_seed_bounds_are_64_bit_and_the_count_is_capped():
    assert check_seeds([2**63 - 1, -(2**63) + 1, 0], "seeds", "f") == [2**63 - 1, -(2**63) + 1, 0]
    for bad in ([2**63], [-(2**63)], [10**100]):
        with pytest.raises(ConfigError, match="64-bit"):
            check_seeds(bad, "seeds", "f")
    check_seeds(list(range(MAX_SEEDS)), "seeds", "f")
    with pytest.raises(ConfigError, match="limit is 1,000"):
        check_seeds(list(range(MAX_SEEDS + 1)), "--seeds", None)


def test_identical_variants_are_warned_naming_both(tmp_path):
    text = OK + "variants:\n  a: {}\n  b: {train.amp: none}\n  c: {train.amp: bf16}\n"
    exp = load(tmp_path, text)
    assert [str(w) for w in exp.warnings] == [
        "exp.yaml: variants: 'b' resolves to the same config as 'a'; it runs once (as 'a'); make them differ or remove one"]
    grid = load(tmp_path, OK + "grid: {train.clip_grad_norm: [1.0, 1]}\n")  # 1.0 and 1 are the same float
    assert len(grid.warnings) == 1 and "'clip_grad_norm=1' resolves to the same config as 'clip_grad_norm=1.0'" in str(
        grid.warnings[0])


def test_sections_are_the_schema_dataclasses():
    assert {"model", "model.roi_heads", "model.rpn.pre_nms_top_n", "data", "train", "eval", "tracking"} <= SECTIONS
    assert "model.roi_heads.mask_head" not in SECTIONS  # a component may be null (no mask branch)


def test_a_component_set_to_null_is_still_allowed(tmp_path):
    exp = load(tmp_path, OK + "eval: {iou_types: [bbox]}\n",
               ["model.roi_heads.mask_head=null", "model.roi_heads.mask_pooler=null", "model.roi_heads.mask_predictor=null"])
    assert exp.variants[0].config.model.roi_heads.mask_head is None


def test_an_over_long_set_key_is_blamed_on_the_set_not_the_base_file(tmp_path):
    line = error(tmp_path, "base: b.yaml\n", ["k" * 300 + "=1"], files={"b.yaml": OK})
    assert line.startswith("--set: kkk") and "unknown key" in line


@pytest.mark.parametrize("where", ["experiment", "base", "folder"])
def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch, where):
    """Permissions cannot be tested by chmod as root: the OS's refusal is raised where the OS would raise it."""
    target = {"experiment": "exp.yaml", "base": "b.yaml", "folder": "b.yaml"}[where]
    (tmp_path / "b.yaml").write_text(OK)
    (tmp_path / "exp.yaml").write_text("base: b.yaml\n")
    real_open, real_stat = open, Path.stat

    def refuse(path, *args, **kwargs):
        if Path(path).name == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def refuse_stat(self, *args, **kwargs):  # a folder without x permission: stat of anything in it fails
        if self.name == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    if where == "folder":
        monkeypatch.setattr(Path, "stat", refuse_stat)
    with pytest.raises(ConfigError) as exc:
        loader.load_experiment(tmp_path / "exp.yaml", families=AsWritten)
    [problem] = exc.value.problems
    assert "permission denied" in problem.message and "chmod" in problem.message
    assert Path(problem.file).name == ("exp.yaml" if where == "folder" else target)
    if where == "folder":
        assert problem.path == "base" and "'b.yaml'" in problem.message
