"""``search:`` is checked at load: every mistake is one line naming the file, the dotted key and the fix; exit 2,
nothing written."""

from __future__ import annotations

import pytest

from rcnn_lab.engine.preflight import COST_METRICS, load_experiment, logged_metrics
from rcnn_lab.errors import ConfigError
from tests.search.conftest import cli, search_experiment

GOOD = """search:
  space:
    train.optimizer.lr: {float: [3.0e-4, 1.0e-2], log: true}
    model.rpn.post_nms_top_n.train: {int: [20, 50], step: 10}
    model.roi_heads.box_head: {choice: [{type: two_mlp}, {type: conv_fc, conv_layers: [16], fc_layers: [32]}]}
  objective: {segm_AP50: max, gflops: min}
  budget: {trials: 4, hours: 1}
  sampler: {type: nsga2, seed: 3}
  confirm: {top_k: 2, seeds: [0, 1, 2]}
"""


def _problems(tmp_path, text: str) -> list[str]:
    path = search_experiment(tmp_path, space=text, budget="")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    return [str(p) for p in err.value.problems]


def test_a_valid_search_loads_typed(tmp_path):
    exp = load_experiment(search_experiment(tmp_path, space=GOOD, budget=""))
    s = exp.search
    assert [p.key for p in s.space] == ["train.optimizer.lr", "model.rpn.post_nms_top_n.train", "model.roi_heads.box_head"]
    lr, topn, head = s.space
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 3e-4, 1e-2, True)
    assert (topn.kind, topn.grid()) == ("int", [20, 30, 40, 50])
    assert head.choices[1] == {"type": "conv_fc", "conv_layers": [16], "fc_layers": [32]}
    assert s.objective == {"segm_AP50": "max", "gflops": "min"}
    assert (s.budget.trials, s.budget.hours, s.sampler.type, s.sampler.seed) == (4, 1.0, "nsga2", 3)
    assert s.confirm.seeds == [0, 1, 2] and s.confirm.top_k == 2
    assert all(v.config.name == "tiny" for v in exp.variants)  # search: is not part of a run's config
    assert s.constraints == {}


def test_constraints_load_and_do_not_change_the_study(tmp_path):
    plain = load_experiment(search_experiment(tmp_path / "a", space=GOOD, budget=""))
    bound = load_experiment(search_experiment(tmp_path / "b", space=GOOD + "  constraints: {segm_AP50: {min: 0.85}}\n",
                                              budget=""))
    (b,) = bound.search.constraints.values()
    assert (b.min, b.max) == (0.85, None)
    assert bound.search.violations({"segm_AP50": 0.9}) == [pytest.approx(-0.05)]
    assert bound.search.violations({"segm_AP50": 0.8}) == [pytest.approx(0.05)]
    assert bound.search.violations({"gflops": 1.0}) is None  # the constrained metric is missing
    assert bound.search.fingerprint == plain.search.fingerprint  # constraints rank trials; they do not define them


@pytest.mark.parametrize("space, key, words", [
    ("train.optimizer.lrr: {float: [0.1, 0.2]}", "search.space.train.optimizer.lrr", ["lrr"]),
    ("train.itrations: {int: [1, 5]}", "search.space.train.itrations", ["not a key", "did you mean 'iterations'"]),
    ("train.iterations: {int: [0, 5]}", "search.space.train.iterations.int", ["low 0", "must be positive"]),
    ("model.rpn.nms_thresh: {float: [0.5, 1.5]}", "search.space.model.rpn.nms_thresh.float", ["high 1.5", "[0, 1]"]),
    ("model.rpn.post_nms_top_n.train: {float: [10.5, 20.5]}", "search.space.model.rpn.post_nms_top_n.train.float",
     ["expected int"]),
    ("train.optimizer.lr: {float: [0.0, 0.1], log: true}", "search.space.train.optimizer.lr.float", ["log: true needs low > 0"]),
    ("train.optimizer.lr: {float: [0.2, 0.1]}", "search.space.train.optimizer.lr.float", ["must be below high"]),
    ("model.roi_heads.box_head: {choice: [{type: two_mlp}, {type: two_mlpp}]}",
     "search.space.model.roi_heads.box_head.choice", ["choice [1]", "two_mlpp", "two_mlp"]),
    ("model.roi_heads.box_head: {choice: [{type: two_mlp, representation_siz: 8}]}",
     "search.space.model.roi_heads.box_head.choice", ["representation_siz"]),
    ("train.optimizer.lr: {floa: [0.1, 0.2]}", "search.space.train.optimizer.lr", ["floa", "did you mean 'float'"]),
    ("model.rpn.post_nms_top_n.train: {int: [20, 45], step: 10}", "search.space.model.rpn.post_nms_top_n.train.step",
     ["does not divide"]),
])
def test_each_space_mistake_is_one_line_with_file_key_and_fix(tmp_path, space, key, words):
    text = f"search:\n  space:\n    {space}\n  objective: {{segm_AP50: max}}\n"
    (line,) = _problems(tmp_path, text)
    assert line.startswith(f"{tmp_path / 'exp.yaml'}: {key}") or line.startswith(f"exp.yaml: {key}"), line
    for w in words:
        assert w in line, line


@pytest.mark.parametrize("extra, key, words", [
    ("  objective: {segm_AP5: max}\n", "search.objective.segm_AP5", ["not a metric", "segm_AP"]),
    ("  objective: {segm_AP50: best}\n", "search.objective.segm_AP50", ["'max', 'min'"]),
    ("  objective: {segm_AP50: max, gflops: min}\n  pruner: {type: asha}\n", "search.pruner.type", ["single objective"]),
    ("  objective: {segm_AP50: max}\n  pruner: {type: asha}\n", "search.pruner.type", ["train.eval_every"]),
    ("  objective: {segm_AP50: max}\n  sampler: {type: grd}\n", "search.sampler.type", ["grid"]),
    ("  objective: {segm_AP50: max}\n  sampler: {type: grid}\n", "search.space.train.optimizer.lr.float", ["step"]),
    ("  objective: {segm_AP50: max}\n  budget: {trials: 0}\n", "search.budget.trials", [">= 1"]),
    ("  objective: {segm_AP50: max}\n  confirm: {top_k: 2, seeds: [0]}\n", "search.confirm.seeds", ["at least 2"]),
    ("  objective: {segm_AP50: max}\n  sampelr: {type: tpe}\n", "search.sampelr", ["unknown key", "sampler"]),
    ("  objective: {gflops: min}\n  constraints: {segm_AP5: {min: 0.8}}\n", "search.constraints.segm_AP5",
     ["not a metric", "segm_AP"]),
    ("  objective: {gflops: min}\n  constraints: {segm_AP50: {}}\n", "search.constraints.segm_AP50", ["min and/or max"]),
    ("  objective: {gflops: min}\n  constraints: {segm_AP50: {min: 0.9, max: 0.8}}\n", "search.constraints.segm_AP50",
     ["must be below max"]),
    ("  objective: {gflops: min}\n  constraints: {segm_AP50: {minimum: 0.8}}\n", "search.constraints.segm_AP50.minimum",
     ["unknown key", "min"]),
    ("  objective: {gflops: min}\n  constraints: {segm_AP50: {min: high}}\n", "search.constraints.segm_AP50.min",
     ["expected"]),
])
def test_each_section_mistake_is_one_line(tmp_path, extra, key, words):
    text = "search:\n  space:\n    train.optimizer.lr: {float: [0.001, 0.01]}\n" + extra
    (line,) = [p for p in _problems(tmp_path, text) if key in p and words[0] in p]  # asha + 2 objectives: 2 lines
    assert f"exp.yaml: {key}" in line, line
    for w in words:
        assert w in line, line


def test_cli_exits_2_and_writes_nothing(tmp_path):
    path = search_experiment(tmp_path, space="search:\n  space:\n    train.itrations: {int: [1, 5]}\n"
                                            "  objective: {segm_AP50: max}\n", budget="")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = cli("search", str(path))
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "search.space.train.itrations" in line and "did you mean 'iterations'" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no store, no Optuna database


def test_search_command_needs_a_search_section(tmp_path):
    path = search_experiment(tmp_path, space="", budget="")
    code, _, err = cli("search", str(path))
    assert code == 2 and "search: this experiment has no search: section" in err


def test_objective_names_are_the_metrics_runs_log(tmp_path):
    exp = load_experiment(search_experiment(tmp_path))
    names = logged_metrics(exp.baseline.config)
    assert {"segm_AP50", "bbox_AP", "segm_ARl", "gflops", "train_time_s"} <= set(names)
    assert set(COST_METRICS) == {"params", "gflops", "peak_memory_mb", "images_per_s", "train_time_s"}


def test_dry_run_prints_the_search_and_writes_nothing(tmp_path):
    path = search_experiment(tmp_path, "  confirm: {top_k: 1, seeds: [0, 1]}\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = cli("search", str(path), "--dry-run")
    assert code == 0, err
    assert "search tiny-search-" in out and "float   train.optimizer.lr: [0.001, 0.02] log" in out
    assert "budget 2 trials" in out and "confirm   top 1 + baseline on seeds [0, 1]" in out
    assert "trials so far: 0" in out and "optuna.db" in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_storage_urls_open_a_study_that_a_second_process_finds(tmp_path, kind):
    import dataclasses

    import optuna

    from rcnn_lab.search import study as st

    exp = load_experiment(search_experiment(tmp_path))
    url = f"sqlite:///{tmp_path / 'o.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'shared' / 'search.log'}"
    exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, storage=url))
    assert st.storage_url(exp.search, "sqlite:///elsewhere/mlflow.db") == url
    study = st.open_study(exp, url)
    trial = study.ask()
    trial.suggest_float("train.optimizer.lr", 0.001, 0.02, log=True)
    study.tell(trial, 0.5)
    again = st.open_study(exp, url)  # load_if_exists: the same study
    assert [t.value for t in again.get_trials()] == [0.5] and again.study_name == study.study_name
    optuna.delete_study(study_name=study.study_name, storage=st.storage(url))


def test_the_default_storage_is_beside_the_mlflow_store(tmp_path):
    from rcnn_lab.search import study as st

    exp = load_experiment(search_experiment(tmp_path))
    assert st.storage_url(exp.search, f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}") == \
        f"sqlite:///{(tmp_path / 'store' / 'optuna.db').resolve()}"
