"""``model.num_classes: auto``: 1 + the categories of data.train, resolved once the datasets are read (preflight),
before the model is built; logged as the resolved number; said by ``validate`` / ``inspect``; configs that do
not use it keep their hash. A finetune-like tiny experiment on folders written by ``rcnn-lab export-shapes``
(5 categories, of which ``category_ids`` selects 2: 3 classes)."""

from __future__ import annotations

import pytest
import torch
import yaml

from rcnn_lab.engine.preflight import auto_num_classes, load_experiment, prepare
from rcnn_lab.errors import ConfigError
from rcnn_lab.models.builder import build_model
from rcnn_lab.runner import tags
from rcnn_lab.runner import weights as rw
from rcnn_lab.runner.plan import make_plan
from tests.runner.conftest import cli, in_folder, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SELECTED = [1, 3]  # circle, triangle: model.num_classes auto -> 3


def coco_variant(folder) -> str:
    data = {split: f"{{type: coco, images: '{folder / split / 'images'}', annotations: "
                   f"'{folder / split / 'annotations.json'}', category_ids: {SELECTED}}}" for split in ("train", "val")}
    return f"  auto: {{model.num_classes: auto, data.train: {data['train']}, data.val: {data['val']}}}\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, new_store):
    """Export the folders with the CLI, run the auto experiment (2 steps), evaluate its run and predict with it."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("auto")
    uri = new_store(root)
    with in_folder(root):
        for split, n in (("train", 4), ("val", 2)):
            code, _, err = cli("export-shapes", "--out", str(root / split), "--split", split, "--num-images", str(n),
                               "--image-size", "64")
            assert code == 0, err
        exp_file = tiny_experiment(root / "exp", uri, name="auto", variants=coco_variant(root))
        validate = {"plain": cli("validate", str(exp_file)), "data": cli("validate", str(exp_file), "--data")}
        inspect = cli("inspect", str(exp_file))
        result = cli("run", str(exp_file), "--no-progress")
        c = MlflowClient(uri)
        (run,) = c.search_runs([c.get_experiment_by_name("auto").experiment_id],
                               tags.filter_equals(tags.KIND, tags.VARIANT_RUN))
        evaluated = cli("eval", str(exp_file), "--run", run.info.run_id, "--no-progress")
        predicted = cli("predict", str(exp_file), str(root / "val" / "images"), "--run", run.info.run_id,
                        "--out", str(root / "predictions"), "--no-progress", "--score", "0")
        checkpoint = rw.checkpoint_of_run(c, run.info.run_id, root / "store")
    return dict(root=root, client=c, exp_file=exp_file, validate=validate, inspect=inspect, result=result, run=run,
                evaluated=evaluated, predicted=predicted, checkpoint=checkpoint)


@pytest.mark.slow
def test_the_run_trains_with_the_datas_class_count_and_logs_it(trained):
    assert trained["result"][0] == 0, trained["result"][2]
    run, c = trained["run"], trained["client"]
    assert run.data.params["model.num_classes"] == "3"  # 1 + the 2 selected categories, not "auto"
    config = yaml.safe_load(open(c.download_artifacts(run.info.run_id, "config.yaml", str(trained["root"]))))
    assert config["model"]["num_classes"] == 3
    state = torch.load(trained["checkpoint"], weights_only=True)["model"]
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    assert state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 3


@pytest.mark.slow
def test_eval_builds_the_model_the_run_trained(trained):
    code, out, err = trained["evaluated"]
    assert code == 0, err + out
    c = trained["client"]
    (ev,) = c.search_runs([c.get_experiment_by_name("auto").experiment_id], tags.filter_equals(tags.KIND, tags.EVAL_RUN))
    assert ev.data.params["model.num_classes"] == "3"
    final = {k: v for k, v in trained["run"].data.metrics.items() if k in ("final/params", "final/gflops")}
    assert len(final) == 2 and all(ev.data.metrics[k] == v for k, v in final.items())  # the same model


@pytest.mark.slow
def test_predict_builds_the_model_the_run_trained(trained):
    code, out, err = trained["predicted"]
    assert code == 0, err + out
    assert "loaded " in out and "kept fresh" not in out  # every tensor of the 3-class model from the checkpoint
    assert (trained["root"] / "predictions" / "results.json").is_file()


@pytest.mark.slow
def test_validate_and_inspect_say_what_auto_resolves_to(trained):
    (code, plain, _), (code_data, data, err) = trained["validate"]["plain"], trained["validate"]["data"]
    assert code == 0 and code_data == 0, err
    assert "model.num_classes: auto -> 1 + data.train's categories, counted when the data is read" in plain
    assert "model.num_classes: auto -> 3 (1 + data.train's 2 categories) for auto" in data
    code, out, err = trained["inspect"]
    assert code == 0, err
    assert "num_classes: auto" in out and "counted when the data is read" in out


def test_auto_is_resolved_by_the_inputs_and_keeps_its_own_hash(tmp_path):
    exp_file = tiny_experiment(tmp_path, None, variants="  six: {}\n  auto: {model.num_classes: auto}\n")
    exp = load_experiment(exp_file)
    six, auto = make_plan(exp)
    assert auto.config.model.num_classes == "auto" and six.hash != auto.hash
    inputs = prepare(auto.config)
    assert inputs.num_classes == 6 and inputs.resolve(auto.config) == six.config  # shapes: 5 categories
    assert prepare(six.config).num_classes is None and prepare(six.config).resolve(six.config) is six.config
    with pytest.raises(ConfigError, match=r"model.num_classes: is auto: the number comes from data.train's categories"):
        build_model(auto.config.model)


def test_auto_needs_a_dataset_with_categories():
    with pytest.raises(ConfigError, match=r"model.num_classes: is auto but data.train \(list\) lists no categories .*"
                                          r"set model.num_classes to 1 \+ its number of classes"):
        auto_num_classes([])


@pytest.mark.parametrize("value, message", [("autp", "expected int or 'auto', got str 'autp'"),
                                            ("1", "must be >= 2")])
def test_other_values_are_one_line_errors(tmp_path, value, message):
    exp_file = tiny_experiment(tmp_path, None)
    with pytest.raises(ConfigError, match=rf"model.num_classes: .*{message}"):
        load_experiment(exp_file, [f"model.num_classes={value}"])
