"""``model.weights`` in the runner: its identity in the config hash, ``run:<id>`` resolved to a finished
run's last checkpoint before any run exists, the load summary printed, tagged and stored as an artifact."""

from __future__ import annotations

import shutil
import urllib.error

import pytest
import torch

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine import weights as w
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.engine.trainer import seed_everything
from rcnn_lab.models.builder import build_model
from rcnn_lab.runner import tags
from rcnn_lab.runner import weights as rw
from rcnn_lab.runner.plan import make_plan
from tests.conftest import EXPERIMENTS
from tests.runner.conftest import cli, files_under, in_folder, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


# --- the config hash -------------------------------------------------------------------------------

# Hashes computed by the code before model.weights existed (commit fb0b55f): a config that does not set it
# must keep its hash, or every finished run would be trained again.
# (quickstart_v1.yaml: the quickstart's recipe then; quickstart.yaml has since adopted the search's trial 12)
HASHES_BEFORE_WEIGHTS = {"base.yaml": "eb888bed817a7dac", "quickstart_v1.yaml": "309d22152ea04112"}


@pytest.mark.parametrize("name", sorted(HASHES_BEFORE_WEIGHTS))
def test_a_config_without_weights_keeps_its_hash(name):
    (run,) = make_plan(load_experiment(EXPERIMENTS / name, check_models=False))
    assert run.config.model.weights is None
    assert run.hash == HASHES_BEFORE_WEIGHTS[name]


def test_the_hash_follows_the_weights_content_not_their_path(tmp_path):
    first, other = tmp_path / "a" / "w.pth", tmp_path / "b.pth"
    first.parent.mkdir()
    torch.save({"x": torch.zeros(2)}, first)
    torch.save({"x": torch.ones(2)}, other)
    copy = tmp_path / "elsewhere" / "renamed.pth"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""base: {EXPERIMENTS / 'base.yaml'}
name: hashes
variants:
  none: {{}}
  file: {{model.weights: {first}}}
  copy: {{model.weights: {copy}}}
  other: {{model.weights: {other}}}
  alias: {{model.weights: coco}}
  named: {{model.weights: MaskRCNN_ResNet50_FPN_Weights.COCO_V1}}
""")
    h = {r.variant.name: r.hash for r in make_plan(load_experiment(exp, check_models=False))}
    assert h["file"] == h["copy"]
    assert len({h["none"], h["file"], h["other"], h["alias"]}) == 4
    assert h["alias"] == h["named"]
    assert h["none"] == HASHES_BEFORE_WEIGHTS["base.yaml"]


# --- run:<id> ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, new_store):
    """A tiny run (6 classes), then a second experiment fine-tuning from it with 8 classes: ``run:<id>``."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("finetune")
    uri = new_store(root)
    with in_folder(root):
        source = cli("run", str(tiny_experiment(root / "a", uri)), "--no-progress")
        c = MlflowClient(uri)
        (trained,) = c.search_runs([c.get_experiment_by_name("tiny").experiment_id],
                                   tags.filter_equals(tags.KIND, tags.VARIANT_RUN))
        (sweep,) = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], tags.filter_equals(tags.KIND, tags.SWEEP))
        spec = f"run:{trained.info.run_id}"
        exp_file = tiny_experiment(root / "b", uri, name="ft",
                                   variants=f"  ft: {{model.weights: '{spec}', model.num_classes: 8}}\n")
        result = cli("run", str(exp_file), "--no-progress")
        bad = {what: cli("run", str(exp_file), "--no-progress", "--set", f"model.weights=run:{rid}")
               for what, rid in (("unknown", "0123456789abcdef"), ("sweep", sweep.info.run_id))}
        checkpoint = rw.checkpoint_of_run(c, trained.info.run_id, root / "store")
    (run,) = c.search_runs([c.get_experiment_by_name("ft").experiment_id], tags.filter_equals(tags.KIND, tags.VARIANT_RUN))
    return dict(root=root, client=c, source=source, result=result, bad=bad, run=run, trained=trained,
                checkpoint=checkpoint, exp_file=exp_file, spec=spec)


@pytest.mark.slow
def test_a_run_id_resolves_to_the_runs_last_checkpoint(finetuned):
    assert finetuned["source"][0] == 0, finetuned["source"][2]
    path = finetuned["checkpoint"]
    assert path.parent.name == ckpt.FOLDER and ckpt.iteration_of(path) == 2
    assert ckpt.load(path)["iteration"] == 2


@pytest.mark.slow
def test_a_run_id_loads_the_same_way_as_its_checkpoint_file(finetuned, tmp_path):
    cfg = load_experiment(finetuned["exp_file"]).variants[0].config
    state = ckpt.load(finetuned["checkpoint"])["model"]
    seed_everything(0)
    model = build_model(cfg.model)
    report = w.apply(model, str(finetuned["checkpoint"]))
    assert [n for n, _, _ in report.fresh] == [
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias"]
    own = model.state_dict()
    assert all(torch.equal(own[n], state[n]) for n in report.loaded)
    code, out, err = finetuned["result"]
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("weights ft seed=0: "))
    assert line.endswith(report.summary())
    assert "kept fresh: roi_heads.box_predictor.cls_score.weight (6 -> 8 classes)" in line


@pytest.mark.slow
def test_the_same_checkpoint_as_a_file_or_as_a_run_id_is_the_same_run(finetuned, tmp_path):
    """The config hash counts ``run:<id>`` by its last checkpoint's content, as it counts a file: the run trained
    from ``run:<id>`` is skipped when the same checkpoint is given by path (a copy elsewhere too)."""
    run, exp_file = finetuned["run"], finetuned["exp_file"]
    copy = tmp_path / "elsewhere.pt"
    shutil.copyfile(finetuned["checkpoint"], copy)
    by_run = make_plan(load_experiment(exp_file))
    by_file = make_plan(load_experiment(exp_file, [f"model.weights={copy}"]))
    assert by_run[0].hash == by_file[0].hash == run.data.tags[tags.CONFIG_HASH]
    other = make_plan(load_experiment(exp_file, [f"model.weights=run:{finetuned['trained'].info.run_id}",
                                                 "train.iterations=3"]))
    assert other[0].hash != by_run[0].hash
    code, out, err = cli("run", str(exp_file), "--no-progress", "--set", f"model.weights={copy}")
    assert code == 0, err
    assert f"skip   ft seed=0 ({by_run[0].hash}): finished run {run.info.run_id}" in out


@pytest.mark.slow
def test_the_summary_is_tagged_and_the_full_list_stored(finetuned):
    run, c = finetuned["run"], finetuned["client"]
    assert run.info.status == "FINISHED"
    summary = run.data.tags[tags.WEIGHTS]
    assert summary.startswith("loaded ") and "kept fresh: roi_heads.box_predictor.cls_score.weight (6 -> 8 classes)" in summary
    assert f"weights ft seed=0: {finetuned['checkpoint'].relative_to(finetuned['root'])}: {summary}" in finetuned["result"][1]
    assert run.data.tags[tags.WEIGHTS_IDENTITY] == w.file_digest(finetuned["checkpoint"])
    assert run.data.params["model.weights"] == finetuned["spec"]
    folder = finetuned["root"] / "listing"
    folder.mkdir(exist_ok=True)
    listing = open(c.download_artifacts(run.info.run_id, "weights.txt", str(folder))).read()
    assert "kept fresh (shape differs): 6" in listing and "file [6, 64] -> model [8, 64]" in listing


@pytest.mark.slow
@pytest.mark.parametrize("what, message", [
    ("unknown", "model.weights: no run '0123456789abcdef' in the tracking store"),
    ("sweep", "is the sweep (parent) run of an invocation; give one of its variant runs"),
])
def test_a_bad_run_id_fails_in_one_line_before_any_run(finetuned, what, message):
    code, out, err = finetuned["bad"][what]
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "--set" in lines[0]
    c = finetuned["client"]
    runs = c.search_runs([c.get_experiment_by_name("ft").experiment_id])
    assert len(runs) == 2  # the fine-tuned run and its sweep run: nothing new


def test_offline_a_hub_name_fails_before_any_store_exists(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch")))  # an empty hub cache

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    exp = tiny_experiment(tmp_path / "exp", None)
    before = files_under(tmp_path)
    code, out, err = cli("run", str(exp), "--set", "model.weights=coco")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "model.weights: could not download MaskRCNN_ResNet50_FPN_Weights.COCO_V1" in line
    assert "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in line
    assert "model.weights: /path/to/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in line
    assert files_under(tmp_path) == before  # no store, no outputs
