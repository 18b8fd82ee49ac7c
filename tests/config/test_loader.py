from __future__ import annotations

import pytest

from rcnn_lab.config.loader import config_hash
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.errors import ConfigError
from tests.conftest import EXPERIMENTS, FIXTURES

BAD = FIXTURES / "configs"


def problems_of(path, overrides=()):
    with pytest.raises(ConfigError) as exc:
        load_experiment(path, list(overrides))
    return exc.value.problems


@pytest.mark.parametrize(
    "fixture, key, words",
    [
        ("unknown_key.yaml", "model.roi_heads.box_head.representaton_size", "did you mean 'representation_size'"),
        ("unknown_section_key.yaml", "model.rpn.pre_nms_topn", "did you mean 'pre_nms_top_n'"),
        ("wrong_type.yaml", "model.num_classes", "expected int"),
        ("anchors_mismatch.yaml", "model.anchor_generator.aspect_ratios", "give 1 (shared) or one per feature map"),
        ("anchors_levels.yaml", "model.anchor_generator.sizes", "gives 5 feature maps"),
        ("cycle_a.yaml", "base", "inheritance cycle"),
        ("bad_yaml.yaml", "", "invalid YAML at line 4"),
        ("unknown_component.yaml", "model.roi_heads.box_head.type", "closest match 'two_mlp'"),
        ("backprop_cpp_pooler.yaml", "model.rpn.proposal_gradient", "returns none for them"),
        ("few_classes.yaml", "model.num_classes", "must be >= 2"),
    ],
)
def test_bad_fixture_names_key_and_file(fixture, key, words):
    problems = problems_of(BAD / fixture)
    match = [p for p in problems if p.path == key and words in p.message]
    assert match, [str(p) for p in problems]
    assert match[0].file and match[0].file.endswith(".yaml")


def test_one_problem_per_line_for_several_problems():
    problems = problems_of(BAD / "wrong_type.yaml")
    assert {p.path for p in problems} == {"model.num_classes", "model.rpn.nms_thresh"}
    assert "must be in [0, 1], got 1.5" in next(p.message for p in problems if p.path == "model.rpn.nms_thresh")


def test_base_yaml_defaults_to_torchvision_settings():
    exp = load_experiment(EXPERIMENTS / "base.yaml")
    cfg = exp.variants[0].config
    assert cfg.model.num_classes == 91
    assert cfg.model.rpn.pre_nms_top_n.train == 2000 and cfg.model.rpn.post_nms_top_n.test == 1000
    assert cfg.model.roi_heads.box_pooler.kwargs == {"output_size": 7, "sampling_ratio": 2}
    assert cfg.model.rpn.proposal_gradient == "detach"


def test_dotted_override_is_typed_by_schema(write_yaml):
    exp = load_experiment(EXPERIMENTS / "base.yaml", ["model.rpn.pre_nms_top_n.train=1000", "model.rpn.nms_thresh=1"])
    rpn = exp.variants[0].config.model.rpn
    assert rpn.pre_nms_top_n.train == 1000 and isinstance(rpn.nms_thresh, float)
    problems = problems_of(EXPERIMENTS / "base.yaml", ["model.rpn.pre_nms_top_n.train=lots"])
    assert problems[0].file == "--set" and problems[0].path == "model.rpn.pre_nms_top_n.train"
    problems = problems_of(EXPERIMENTS / "base.yaml", ["model.rpn.nms_thres=0.5"])
    assert "did you mean 'nms_thresh'" in problems[0].message


def test_inheritance_several_levels_and_type_change_replaces_spec(write_yaml):
    write_yaml("a.yaml", f"base: {EXPERIMENTS / 'base.yaml'}\nname: a\nmodel: {{rpn: {{nms_thresh: 0.6}}}}\n")
    write_yaml("b.yaml", "base: a.yaml\nname: b\nmodel: {roi_heads: {box_head: {type: conv_fc, fc_layers: [256]}}}\n")
    exp = load_experiment(write_yaml("c.yaml", "base: b.yaml\nname: c\nmodel: {rpn: {score_thresh: 0.1}}\n"))
    cfg = exp.variants[0].config
    assert cfg.name == "c" and cfg.model.rpn.nms_thresh == 0.6 and cfg.model.rpn.score_thresh == 0.1
    assert cfg.model.roi_heads.box_head.type == "conv_fc"
    assert "representation_size" not in cfg.model.roi_heads.box_head.kwargs  # two_mlp's kwargs did not leak


def test_variants_grid_seeds_expand_deterministically(write_yaml):
    path = write_yaml("exp.yaml", f"""
base: {EXPERIMENTS / 'base.yaml'}
name: sweep
seeds: [0, 1]
baseline: b
variants:
  a: {{model.rpn.nms_thresh: 0.6}}
  b: {{}}
grid:
  model.roi_heads.box_pooler.sampling_ratio: [1, 2]
""")
    exp = load_experiment(path)
    names = [v.name for v in exp.variants]
    assert names == ["a/sampling_ratio=1", "a/sampling_ratio=2", "b/sampling_ratio=1", "b/sampling_ratio=2"]
    assert exp.seeds == [0, 1]
    assert exp.variant("a/sampling_ratio=1").changed == {
        "model.rpn.nms_thresh": 0.6, "model.roi_heads.box_pooler.sampling_ratio": 1}
    with pytest.raises(ConfigError, match="baseline"):
        load_experiment(write_yaml("exp2.yaml", path.read_text().replace("baseline: b", "baseline: c")))
    again = load_experiment(path)
    assert [config_hash(v.with_seed(1)) for v in again.variants] == [config_hash(v.with_seed(1)) for v in exp.variants]
    hashes = {config_hash(v.with_seed(s)) for v in exp.variants for s in exp.seeds}
    assert len(hashes) == 8


def test_hash_ignores_names_and_tracking_but_not_seed():
    exp = load_experiment(EXPERIMENTS / "base.yaml")
    other = load_experiment(EXPERIMENTS / "base.yaml", ["name=renamed", "tracking.uri=sqlite:///x.db"])
    v, w = exp.variants[0], other.variants[0]
    assert config_hash(v.config) == config_hash(w.config)
    assert config_hash(v.with_seed(1)) != config_hash(v.with_seed(2))


def test_unknown_variant_suggests_closest(write_yaml):
    exp = load_experiment(EXPERIMENTS / "base.yaml")
    with pytest.raises(ConfigError, match="did you mean 'default'"):
        exp.variant("defualt")


def test_yaml_reads_exponent_floats_like_yaml_1_2(write_yaml):
    path = write_yaml("exp.yaml", f"""
base: {EXPERIMENTS / 'base.yaml'}
train: {{optimizer: {{type: adamw, lr: 1e-4, weight_decay: 5e-2}}}}
""")
    cfg = load_experiment(path, ["train.clip_grad_norm=1e1"]).variants[0].config
    assert cfg.train.optimizer.kwargs["lr"] == 1e-4
    assert cfg.train.optimizer.kwargs["weight_decay"] == 0.05
    assert cfg.train.clip_grad_norm == 10.0


def test_partial_spec_override_keeps_the_default_component(write_yaml):
    path = write_yaml("exp.yaml", "name: bare\nmodel: {roi_heads: {box_head: {representation_size: 256}}}\n")
    cfg = load_experiment(path, ["train.optimizer.lr=0.01"]).variants[0].config
    assert cfg.train.optimizer.type == "sgd" and cfg.train.optimizer.kwargs["lr"] == 0.01
    assert cfg.train.optimizer.kwargs["momentum"] == 0.9  # the default spec's other arguments stay
    assert cfg.model.roi_heads.box_head.type == "two_mlp"
    assert cfg.model.roi_heads.box_head.kwargs["representation_size"] == 256
    with pytest.raises(ConfigError, match=r"train\.optimizer\.lrr.*did you mean 'lr'"):
        load_experiment(path, ["train.optimizer.lrr=0.01"])


def test_duplicate_yaml_keys_are_rejected_with_their_lines(write_yaml):
    path = write_yaml("dup.yaml", "name: x\nmodel: {num_classes: 3}\ntrain: {seed: 1}\nmodel: {num_classes: 4}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*line 4.*duplicate key 'model' \(first at line 2\)"):
        load_experiment(path)


def test_the_config_layer_loads_with_the_checks_it_is_handed(write_yaml):
    """``config.loader`` knows no registry: specs go to ``families``, plugins and model checks to callbacks."""
    from rcnn_lab.config import loader
    from rcnn_lab.config.types import Spec
    from rcnn_lab.errors import Problem

    seen: list[str] = []

    class Family:
        def __init__(self, name):
            self.name = name

        def check_spec(self, value, path, problems):
            seen.append(path)
            if value.get("type") == "nope":
                problems.append(Problem(f"{path}.type", f"no {self.name} named nope"))
            return Spec(value["type"], {k: v for k, v in value.items() if k != "type"})

    plugins, checked = [], []
    path = write_yaml("exp.yaml", "name: pure\nplugins: [p.py]\nmodel: {num_classes: 3}\n")
    exp = loader.load_experiment(path, ["train.iterations=7"], families=Family,
                                 load_plugins=lambda file, extra, base: plugins.append((file, extra, base)),
                                 check=lambda cfg: checked.append(cfg.name) or [])
    assert exp.variants[0].config.train.iterations == 7 and exp.tracking_name == "pure"
    assert plugins == [(path, ["p.py"], path.parent)] and checked == ["pure"]
    assert {"model.backbone", "train.optimizer", "data.train"} <= set(seen)
    with pytest.raises(ConfigError, match=r"--set: model\.backbone\.type: no backbone named nope"):
        loader.load_experiment(path, ["model.backbone.type=nope"], families=Family)
    with pytest.raises(TypeError, match="needs `families`"):
        loader.load_experiment(path, families=None)


def test_duplicate_seeds_run_once_with_a_warning(write_yaml):
    path = write_yaml("exp.yaml", "name: t\nseeds: [3, 1, 3, 1, 2]\n")
    exp = load_experiment(path, check_models=False)
    assert exp.seeds == [3, 1, 2]
    (w,) = exp.warnings
    assert w.path == "seeds" and w.file.endswith("exp.yaml")
    assert "1, 3 listed more than once" in w.message


def test_post_nms_above_pre_nms_is_warned_not_refused(write_yaml):
    path = write_yaml("exp.yaml", "name: t\nmodel: {rpn: {pre_nms_top_n: {train: 100, test: 1000}}}\n")
    exp = load_experiment(path, check_models=False)
    (w,) = exp.warnings  # train: 2000 > 100; test: 1000 == 1000 is fine
    assert w.path == "model.rpn.post_nms_top_n.train" and "2000 exceeds pre_nms_top_n.train (100)" in w.message
    assert load_experiment(write_yaml("ok.yaml", "name: t\n"), check_models=False).warnings == []


def test_an_error_under_a_key_a_variant_set_names_the_variants_file(write_yaml):
    write_yaml("base.yaml", "name: t\nmodel: {anchor_generator: {type: grid, sizes: [[32], [64], [128], [256], [512]]}}\n")
    exp = write_yaml("exp.yaml", "base: base.yaml\nvariants:\n  v: {model.anchor_generator.sizes: [[32], [64], [x], [256], [512]]}\n")
    (p,) = problems_of(exp)
    assert p.path == "model.anchor_generator.sizes[2][0]" and p.file.endswith("exp.yaml")
    indexed = write_yaml("idx.yaml", "base: base.yaml\nvariants:\n  v: {'model.anchor_generator.sizes[2]': [7]}\n")
    (p,) = problems_of(indexed)
    assert p.file.endswith("idx.yaml") and "set the whole list (model.anchor_generator.sizes: [...])" in p.message


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", "with space", ""])
def test_names_that_would_leave_the_runs_folder_are_refused(write_yaml, name):
    (p,) = problems_of(write_yaml("exp.yaml", f"name: '{name}'\n"))
    assert p.path == "name" and "plain name" in p.message


def test_plain_names_with_dots_dashes_and_underscores_pass(write_yaml):
    exp = load_experiment(write_yaml("exp.yaml", "name: ablation_v2.1-b\ntracking: {experiment: Team-x.1}\n"), check_models=False)
    assert exp.name == "ablation_v2.1-b"


@pytest.mark.parametrize("override, key, words", [
    ("train.optimizer.lr=-0.01", "train.optimizer.lr", "must be > 0"),
    ("train.optimizer.lr=0", "train.optimizer.lr", "must be > 0"),
    ("train.optimizer.lr=.nan", "train.optimizer.lr", "finite"),
    ("train.optimizer={type: adamw, eps: -1}", "train.optimizer.eps", "must be > 0"),
    ("train.optimizer.weight_decay=-1e-4", "train.optimizer.weight_decay", "must be >= 0"),
    ("train.clip_grad_norm=.nan", "train.clip_grad_norm", "finite"),
    ("train.clip_grad_norm=.inf", "train.clip_grad_norm", "finite"),
    ("eval.max_images=0", "eval.max_images", "positive"),
    ("eval.max_images=-3", "eval.max_images", "positive"),
    ("train.iterations=99999999999999999999", "train.iterations", "out of range"),
])
def test_values_that_used_to_fail_only_after_a_run_record_fail_at_load(override, key, words):
    (p,) = problems_of(EXPERIMENTS / "base.yaml", [override])
    assert p.path == key and words in p.message and p.file == "--set"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads_and_builds_on_the_meta_device(path):
    exp = load_experiment(path)  # check_models: every variant's model built on the meta device
    assert exp.variants and all(v.config.name == exp.name for v in exp.variants)
