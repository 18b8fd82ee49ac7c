"""``model.weights`` (engine/weights.py): a whole detector initialised from a file or a torchvision name.

The reference is torchvision's fine-tuning tutorial: ``maskrcnn_resnet50_fpn(weights=...)``, then
``box_predictor`` replaced by a ``FastRCNNPredictor`` and ``mask_predictor`` by a ``MaskRCNNPredictor``
for the new classes. No download here: torchvision's own builder is handed the seeded file's
state_dict in place of the COCO download (``WeightsEnum.get_state_dict``), so its construction
(frozen BatchNorm, 3 trainable stages, strict loading) is the one compared against. R50 on CPU at
160 px, eval mode, one image; the models are built once per module.
"""

from __future__ import annotations

import shutil
import urllib.error

import pytest
import torch
import torchvision
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine import weights as w
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.engine.trainer import Trainer, seed_everything
from rcnn_lab.errors import ConfigError
from rcnn_lab.models.builder import build_model
from tests.conftest import EXPERIMENTS, TINY_MODEL

SIZE = 160
SEED = 3
PREDICTORS = {  # the tensors whose shape follows num_classes
    "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias",
}


def model_config(tmp_path, weights=None, extra: str = "", name: str = "ft.yaml"):
    path = tmp_path / name
    path.write_text(f"""base: {EXPERIMENTS / 'base.yaml'}
name: ft
model:
  num_classes: 2
  transform: {{min_size: {SIZE}, max_size: {SIZE}}}
{f'  weights: {weights}' if weights else ''}
{extra}""")
    return load_experiment(path).variants[0].config.model


@pytest.fixture(scope="module")
def seeded_file(tmp_path_factory):
    """A seeded ``torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None)`` saved to a file."""
    torch.manual_seed(1234)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_seeded.pth"
    torch.save(tv.state_dict(), path)
    return path


COCO_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"  # torchvision's download of MaskRCNN_ResNet50_FPN_Weights.COCO_V1


@pytest.fixture(scope="module")
def loaded(seeded_file, tmp_path_factory):
    """The YAML model (num_classes: 2, model.weights: coco), seeded, built, loaded as the trainer does;
    torch's hub cache holds the seeded file under the name of torchvision's COCO_V1 download."""
    home = tmp_path_factory.mktemp("torch")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(seeded_file, home / "hub" / "checkpoints" / COCO_FILE)
    cfg = model_config(tmp_path_factory.mktemp("cfg"), "coco")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        seed_everything(SEED)
        model = build_model(cfg)
        report = w.apply(model, cfg.weights)
    return cfg, model.eval(), report


@pytest.fixture(scope="module")
def file_state(seeded_file):
    return torch.load(seeded_file, weights_only=True)


def test_every_tensor_but_the_resized_predictors_is_the_files(loaded, file_state):
    cfg, model, report = loaded
    own = model.state_dict()
    assert {name for name, _, _ in report.fresh} == PREDICTORS
    assert not report.missing
    assert set(report.unexpected) == set()  # num_batches_tracked (BatchNorm counters) are not weights
    for name, tensor in own.items():
        if name not in PREDICTORS:
            assert torch.equal(tensor, file_state[name]), name
    assert report.summary().startswith(f"loaded {len(own) - 6} of {len(own)} tensors; kept fresh: "
                                       "roi_heads.box_predictor.cls_score.weight (91 -> 2 classes)")
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight  file [91, 256, 1, 1] -> model [2, 256, 1, 1]" in report.as_text()


def test_fresh_tensors_are_the_seeds(loaded, tmp_path):
    """Loading draws no random numbers: the predictors keep what the seed gave them (as without weights)."""
    _, model, _ = loaded
    seed_everything(SEED)
    plain = build_model(model_config(tmp_path)).state_dict()
    own = model.state_dict()
    for name in PREDICTORS:
        assert torch.equal(own[name], plain[name]), name


def test_outputs_equal_torchvisions_fine_tuning_tutorial(loaded, seeded_file, file_state, monkeypatch):
    _, model, _ = loaded
    weights = torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    monkeypatch.setattr(type(weights), "get_state_dict", lambda self, *a, **k: dict(file_state))  # "load the file"
    tut = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=weights, min_size=SIZE, max_size=SIZE)
    in_features = tut.roi_heads.box_predictor.cls_score.in_features
    tut.roi_heads.box_predictor = FastRCNNPredictor(in_features, 2)
    tut.roi_heads.mask_predictor = MaskRCNNPredictor(tut.roi_heads.mask_predictor.conv5_mask.in_channels, 256, 2)
    # the same backbone rules as torchvision's builder with weights: frozen BatchNorm (eps 0 for COCO_V1), 3 trainable stages
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert w.frozen_bn_eps(model) == w.frozen_bn_eps(tut) == 0.0
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [(n, p.requires_grad) for n, p in tut.named_parameters()]
    tut.roi_heads.box_predictor.load_state_dict(model.roi_heads.box_predictor.state_dict())
    tut.roi_heads.mask_predictor.load_state_dict(model.roi_heads.mask_predictor.state_dict())
    tut.eval()
    image = torch.rand(3, 120, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model([image])[0], tut([image])[0]
    assert ours["boxes"].shape[0] > 0
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(ours[key], theirs[key]), key


def test_an_rcnn_lab_checkpoint_loads_the_same_way(loaded, file_state, tmp_path):
    cfg, model, report = loaded
    path = ckpt.path_for(tmp_path / "checkpoints", 10)
    ckpt.save(path, {"model": dict(file_state), "optimizer": {}, "iteration": 10, w.EPS_KEY: 0.0})
    state, identity = w.read_state(str(path))
    assert identity == w.file_digest(path) != report.identity
    assert state.frozen_bn_eps == 0.0  # the eps the checkpoint's model ran with
    assert state.keys() == file_state.keys() and all(torch.equal(state[k], file_state[k]) for k in state)
    seed_everything(SEED)
    again = build_model(cfg)
    second = w.load_into(again, state, source=str(path), identity=identity)
    assert second.loaded == report.loaded and second.fresh == report.fresh and w.frozen_bn_eps(again) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_a_file_saved_from_ddp_loads_without_its_module_prefix(file_state, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in file_state.items()}, path)
    state, _ = w.read_state(str(path))
    assert state.keys() == file_state.keys()


def test_an_r18_file_into_an_r50_model_fails_in_one_line(loaded, tmp_path):
    _, model, _ = loaded
    r18 = build_model(model_config(tmp_path, extra="  backbone: {type: resnet_fpn, depth: 18}\n", name="r18.yaml"))
    path = tmp_path / "r18.pth"
    torch.save(r18.state_dict(), path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        w.apply(model, str(path), file="ft.yaml")
    text = str(err.value)
    assert "\n" not in text and text.startswith("ft.yaml: model.weights: ")
    assert "does not fit this model" in text and "same architecture" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


@pytest.mark.parametrize("content, fix", [
    (b"not a torch file", "not a readable weights file"),
    (None, "not found"),
    ("folder", "is a folder, not a weights file"),
])
def test_bad_files_fail_in_one_line(tmp_path, content, fix):
    path = tmp_path / "bad.pth"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        w.read_state(str(path), key="--weights")
    assert "\n" not in str(err.value) and str(err.value).startswith("--weights: ") and fix in str(err.value)


def test_a_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ConfigError, match="holds no tensors by name"):
        w.read_state(str(path))


def test_the_same_file_anywhere_has_one_identity_and_another_file_another(seeded_file, tmp_path):
    copy = tmp_path / "elsewhere" / "renamed.pth"
    copy.parent.mkdir()
    shutil.copyfile(seeded_file, copy)
    assert w.identity_of(str(copy)) == w.identity_of(str(seeded_file)) == w.file_digest(seeded_file)
    other = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, other)
    assert w.identity_of(str(other)) != w.identity_of(str(seeded_file))


@pytest.mark.parametrize("extra, trainable, frozen", [
    ("", ["layer2", "layer3", "layer4"], True),  # torchvision with weights: 3 stages, FrozenBatchNorm2d
    ("  backbone: {type: resnet_fpn, depth: 50, trainable_layers: 5, norm: batchnorm}\n",
     ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"], False),  # what the YAML says wins
])
def test_detector_weights_bring_torchvisions_fine_tuning_defaults(tmp_path, extra, trainable, frozen):
    cfg = model_config(tmp_path, "coco", extra)
    with torch.device("meta"):
        model = build_model(cfg)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) == frozen
    stages = sorted({n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad})
    assert stages == sorted(trainable)


V2 = """  backbone: {type: resnet_fpn, depth: 50, fpn_norm: batchnorm}
  rpn: {head: {type: conv, conv_depth: 2}}
  roi_heads:
    box_head: {type: conv_fc, conv_layers: [256, 256, 256, 256], fc_layers: [1024], norm: batchnorm}
    mask_head: {type: conv_stack, layers: [256, 256, 256, 256], dilation: 1, norm: batchnorm}
"""  # torchvision's maskrcnn_resnet50_fpn_v2, written out


@pytest.mark.parametrize("weights, builder, enum", [
    ("coco", torchvision.models.detection.maskrcnn_resnet50_fpn,
     torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    ("coco_v2", torchvision.models.detection.maskrcnn_resnet50_fpn_v2,  # BatchNorm2d in the body, 3 stages
     torchvision.models.detection.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
])
def test_the_backbone_is_what_torchvisions_builder_makes_for_those_weights(tmp_path, monkeypatch, weights, builder, enum):
    """Module types and trainable parameters as torchvision's builder makes them when given the weights."""
    path = tmp_path / "coco.yaml"
    path.write_text(f"base: {EXPERIMENTS / 'base.yaml'}\nname: c\nmodel:\n  weights: {weights}\n{V2 if weights == 'coco_v2' else ''}")
    cfg = load_experiment(path).variants[0].config.model
    with torch.device("meta"):  # no download: torchvision's builder is handed a state_dict of its own shapes
        state = builder(weights=None, weights_backbone=None).state_dict()
        monkeypatch.setattr(type(enum), "get_state_dict", lambda self, *a, **k: state)
        theirs = builder(weights=enum)
        ours = build_model(cfg)
    assert [type(m) for m in ours.modules()][1:] == [type(m) for m in theirs.modules()][1:]  # [0]: the assembled class
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [(n, p.requires_grad) for n, p in theirs.named_parameters()]


def test_without_weights_the_backbone_trains_whole(tmp_path):
    cfg = model_config(tmp_path)
    with torch.device("meta"):
        model = build_model(cfg)
    assert not isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in model.backbone.body.parameters())


# --- torchvision names ---------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and no network: a download fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_aliases_name_torchvisions_weights_for_the_model_built():
    assert w.identity_of("coco") == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert w.identity_of("coco", with_masks=False) == "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert w.identity_of("coco_v2") == "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
    assert w.identity_of("MaskRCNN_ResNet50_FPN_Weights.DEFAULT") == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"


def test_a_cached_hub_file_is_read_from_torchs_cache(hub, seeded_file, file_state):
    hub.mkdir(parents=True)
    shutil.copyfile(seeded_file, hub / COCO_FILE)
    state, identity = w.read_state("coco")
    assert identity == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1" and state.frozen_bn_eps == 0.0
    assert all(torch.equal(state[k], file_state[k]) for k in file_state)
    plain, _ = w.read_state(str(seeded_file))
    assert plain.frozen_bn_eps is None  # another content: FrozenBatchNorm2d keeps its default eps


def test_offline_a_hub_name_fails_in_one_line_saying_where_to_put_the_file(hub):
    with pytest.raises(ConfigError) as err:
        w.read_state("MaskRCNN_ResNet50_FPN_Weights.COCO_V1", file="ft.yaml")
    text = str(err.value)
    assert "\n" not in text and text.startswith("ft.yaml: model.weights: could not download")
    assert "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in text
    assert f"put it in {hub}" in text
    assert "model.weights: /path/to/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in text


@pytest.mark.parametrize("spec, message", [
    ("MaskRCNN_ResNet99_Weights.COCO_V1", "unknown torchvision weights"),
    ("MaskRCNN_ResNet50_FPN_Weights.COCO_V9", "has no 'COCO_V9'"),
])
def test_unknown_names_fail_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        w.identity_of(spec)
    assert "\n" not in str(err.value)


def test_a_run_id_is_left_to_the_runner():
    assert w.identity_of("run:abc123") == "run:abc123"
    with pytest.raises(ConfigError, match="resolve it with rcnn_lab.runner.weights"):
        w.read_state("run:abc123")


# --- the trainer -----------------------------------------------------------------------------------

def tiny_run(tmp_path, weights=None):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""base: {EXPERIMENTS / 'base.yaml'}
name: tiny
{TINY_MODEL}
data:
  train: {{type: shapes, split: train, num_images: 4, image_size: 64}}
  val: {{type: shapes, split: val, num_images: 2, image_size: 64}}
  batch_size: 2
train: {{iterations: 2, device: cpu, checkpoint_every: 0}}
""")
    return load_experiment(path, [f"model.weights={weights}"] if weights else []).variants[0].config


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """Weights of the tiny model with 9 classes (the tiny config has 6), another seed."""
    folder = tmp_path_factory.mktemp("tiny")
    cfg = tiny_run(folder)
    torch.manual_seed(77)
    model = build_model(load_experiment(folder / "tiny.yaml", ["model.num_classes=9"]).variants[0].config.model)
    path = folder / "tiny9.pth"
    torch.save(model.state_dict(), path)
    return path, cfg


@pytest.mark.slow
def test_the_trainer_loads_after_seeding_and_building_but_not_when_resuming(tiny_file, tmp_path):
    path, _ = tiny_file
    cfg = tiny_run(tmp_path, path)
    state = torch.load(path, weights_only=True)
    trainer = Trainer(cfg, tmp_path / "out")
    report = trainer.weights_report
    assert report is not None and len(report.fresh) == 6 and report.identity == w.file_digest(path)
    own = trainer.model.state_dict()
    assert all(torch.equal(own[n], state[n]) for n in report.loaded)
    plain = Trainer(tiny_run(tmp_path), tmp_path / "plain").model.state_dict()
    assert all(torch.equal(own[n], plain[n]) for n, _, _ in report.fresh)  # the seed's, as without weights
    trainer.save_checkpoint(1)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in own.items()}
    saved = ckpt.load(ckpt.latest(ckpt.folder(tmp_path / "out")))
    assert saved[w.EPS_KEY] == 1e-5  # frozen BatchNorm (detector weights), torchvision's default eps
    saved["model"], saved[w.EPS_KEY] = changed, 0.0
    ckpt.save(ckpt.latest(ckpt.folder(tmp_path / "out")), saved)
    resumed = Trainer(cfg, tmp_path / "out")
    assert resumed.weights_report is None and resumed.start_iteration == 1
    assert all(torch.equal(v, changed[k]) for k, v in resumed.model.state_dict().items())
    assert w.frozen_bn_eps(resumed.model) == 0.0


# --- experiments/finetune.yaml ---------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_experiment_trains_from_coco_weights_on_a_coco_folder(hub, seeded_file, tmp_path, monkeypatch):
    """The documented steps on an exported COCO-format folder: the class count comes from the data
    (``num_classes: auto``), then the run starts from the (stand-in) COCO weights with fresh predictors. 64 px, 1 step,
    10 detections per image in the evaluation."""
    from rcnn_lab.data.export import export_shapes
    from rcnn_lab.engine.preflight import prepare

    hub.mkdir(parents=True)
    shutil.copyfile(seeded_file, hub / COCO_FILE)
    monkeypatch.chdir(tmp_path)
    export_shapes("my_data/train", "train", num_images=4, image_size=64)
    export_shapes("my_data/val", "val", num_images=2, image_size=64)
    small = ["model.transform.min_size=64", "model.transform.max_size=64", "train.iterations=1", "train.device=cpu",
             "model.roi_heads.detections_per_img=10"]
    cfg = load_experiment(EXPERIMENTS / "finetune.yaml", small).variants[0].config
    assert cfg.model.weights == "coco" and cfg.model.num_classes == "auto"
    with pytest.raises(ConfigError, match=r"model.num_classes: is 2 but data.train has 5 categories .*"
                                          r"set model.num_classes to 6"):
        prepare(load_experiment(EXPERIMENTS / "finetune.yaml", [*small, "model.num_classes=2"]).variants[0].config)
    assert prepare(cfg).num_classes == 6  # 1 + the 5 categories of data.train
    trainer = Trainer(cfg, tmp_path / "out")
    assert trainer.config.model.num_classes == 6 and trainer.model.roi_heads.box_predictor.cls_score.out_features == 6
    report = trainer.weights_report
    assert report.identity == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1" and w.frozen_bn_eps(trainer.model) == 0.0
    assert {n for n, _, _ in report.fresh} == PREDICTORS and "(91 -> 6 classes)" in report.summary()
    result = trainer.fit()
    assert result.iterations == 1 and "bbox_AP" in result.metrics
    assert torch.load(ckpt.latest(ckpt.folder(tmp_path / "out")), weights_only=True)[w.EPS_KEY] == 0.0


def test_weights_that_do_not_fit_are_found_at_load_and_a_run_writes_nothing(hub, seeded_file, tmp_path, monkeypatch):
    """model.weights are checked against the variant's model on the meta device when the experiment is loaded: a
    file memory-mapped, a torchvision name once in torch's hub cache (not downloaded then: preflight fetches it
    and checks it the same way). Before, a file of another network made a FAILED run in the store."""
    from rcnn_lab.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RCNN_LAB_RUNS", str(tmp_path / "runs"))
    quick = EXPERIMENTS / "quickstart.yaml"  # a ResNet-10 model: the ResNet-50 files below do not fit it
    load_experiment(quick, ["model.weights=coco"])  # not in the hub cache: left to preflight, nothing downloaded
    # run's preflight downloads it (here: the seeded file as the download), then refuses it before a store exists
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, *a, **k: shutil.copyfile(seeded_file, dst))
    assert main(["run", str(quick), "--set", "model.weights=coco", "--no-progress"]) == 2
    assert not (tmp_path / "runs").exists() and (hub / COCO_FILE).is_file()
    (hub / COCO_FILE).unlink()
    shutil.copyfile(seeded_file, hub / COCO_FILE)
    with pytest.raises(ConfigError, match=r"model.weights: MaskRCNN_ResNet50_FPN_Weights.COCO_V1 does not fit this model"):
        load_experiment(quick, ["model.weights=coco"])
    assert main(["run", str(quick), "--set", f"model.weights={seeded_file}", "--no-progress"]) == 2
    assert not (tmp_path / "runs").exists()  # no store, no run
    load_experiment(EXPERIMENTS / "base.yaml", ["model.weights=coco"])  # the ResNet-50 it was made for takes it
