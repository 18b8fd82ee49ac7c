from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

import rcnn_lab
from rcnn_lab.errors import ConfigError
from rcnn_lab.models.builder import count_parameters
from tests.conftest import EXPERIMENTS


@pytest.fixture(scope="module")
def base_pair():
    exp = rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml")
    ours = rcnn_lab.build_model(exp.variants[0].config.model)
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    return ours, ref


def test_base_yaml_is_module_for_module_torchvision(base_pair):
    ours, ref = base_pair
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert isinstance(ours, torchvision_maskrcnn())
    assert count_parameters(ours) == count_parameters(ref)
    frozen = [n for n, p in ours.named_parameters() if not p.requires_grad]
    assert frozen == [n for n, p in ref.named_parameters() if not p.requires_grad]


def test_same_seed_gives_torchvision_initial_weights():
    # the parts are built (and initialised from the RNG) in torchvision's order
    exp = rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml")
    torch.manual_seed(7)
    ours = rcnn_lab.build_model(exp.variants[0].config.model).state_dict()
    torch.manual_seed(7)
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    assert list(ours) == list(ref) and len(ours) == 360
    assert [k for k in ours if not torch.equal(ours[k], ref[k])] == []


def torchvision_maskrcnn():
    from torchvision.models.detection import MaskRCNN

    return MaskRCNN


def test_loaded_torchvision_weights_give_identical_outputs(base_pair):
    ours, ref = base_pair
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    assert (ours.transform.min_size, ours.transform.max_size) == (ref.transform.min_size, ref.transform.max_size)
    for m in (ours, ref):  # the same on both, to keep the test fast: 320 px instead of 800, the mask head on 10
        m.transform.min_size, m.transform.max_size = (320,), 400  # detections per image instead of 100
        m.roi_heads.detections_per_img = 10
    torch.manual_seed(0)
    images = [torch.rand(3, 160, 200), torch.rand(3, 128, 128)]
    with torch.no_grad():
        out_a, out_b = ours(images), ref(images)
    for a, b in zip(out_a, out_b):
        assert a.keys() == b.keys() and len(a["masks"]) == 10
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_frozen_batchnorm_matches_pretrained_layout():
    exp = rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", ["model.backbone.norm=frozen_batchnorm", "model.backbone.trainable_layers=3"])
    model = rcnn_lab.build_model(exp.variants[0].config.model)
    base = rcnn_lab.build_model(rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml").variants[0].config.model)
    affine = sum(p.numel() for m in base.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert affine > 0 and count_parameters(model) == count_parameters(base) - affine  # BN affine terms become buffers
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_local_weights_file_loads_and_bad_file_is_a_clear_error(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    body = resnet18()
    torch.save(body.state_dict(), tmp_path / "r18.pth")
    exp = rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", ["model.backbone.depth=18", f"model.backbone.weights={tmp_path / 'r18.pth'}"])
    model = rcnn_lab.build_model(exp.variants[0].config.model)
    assert torch.equal(model.backbone.body.conv1.weight, body.conv1.weight)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as exc:  # found when the experiment is loaded (the meta-device check)
        rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", [f"model.backbone.weights={tmp_path / 'junk.pth'}"])
    assert exc.value.problems[0].path == "model.backbone.weights" and "not a loadable state_dict" in str(exc.value)
    (tmp_path / "r18.pth").write_bytes(b"not a checkpoint")  # spoilt after loading: found when the model is built
    with pytest.raises(ConfigError) as exc:
        rcnn_lab.build_model(exp.variants[0].config.model)
    assert exc.value.problems[0].path == "model.backbone.weights" and "not a loadable state_dict" in str(exc.value)


def test_imagenet_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: forces a download attempt

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    import torchvision.models._api as weights_api

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    exp = rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", ["model.backbone.depth=18", "model.backbone.weights=imagenet"])
    with pytest.raises(ConfigError) as exc:
        rcnn_lab.build_model(exp.variants[0].config.model)
    p = exc.value.problems[0]
    assert p.path == "model.backbone.weights" and "weights: /path/to/resnet18" in p.message


@pytest.mark.parametrize("fpn_norm, kind", [("batchnorm", torch.nn.BatchNorm2d), ("groupnorm", torch.nn.GroupNorm)])
def test_fpn_norm_normalises_every_fpn_convolution(fpn_norm, kind):
    from rcnn_lab.models.backbones import resnet_fpn

    plain = resnet_fpn(depth=18, returned_layers=[2, 3], out_channels=64)
    normed = resnet_fpn(depth=18, returned_layers=[2, 3], out_channels=64, fpn_norm=fpn_norm)
    assert not any(isinstance(m, kind) for m in plain.fpn.modules())
    blocks = [*normed.fpn.inner_blocks, *normed.fpn.layer_blocks]
    assert len(blocks) == 4 and all(isinstance(block[1], kind) for block in blocks)
    out = normed(torch.rand(2, 3, 64, 64))
    assert list(out) == ["0", "1", "pool"] and out["0"].shape == (2, 64, 8, 8)


def test_blocks_build_a_shallower_resnet_and_the_depths_own_blocks_build_torchvisions():
    from torchvision.models import resnet18

    from rcnn_lab.models.backbones import resnet_fpn

    torch.manual_seed(3)
    own = resnet_fpn(depth=18, blocks=[2, 2, 2, 2]).body.state_dict()
    torch.manual_seed(3)
    ref = resnet18().state_dict()  # the same body, initialised from the same RNG stream
    assert list(own) == [k for k in ref if k in own] and all(torch.equal(own[k], ref[k]) for k in own)

    r10 = resnet_fpn(depth=18, blocks=[1, 1, 1, 1], returned_layers=[2, 3], out_channels=64)
    r18 = resnet_fpn(depth=18, returned_layers=[2, 3], out_channels=64)
    assert [len(r10.body[f"layer{i}"]) for i in (1, 2, 3)] == [1, 1, 1]  # layer4 is never computed: not kept
    assert count_parameters(r10) < 0.6 * count_parameters(r18)
    out, ref_out = r10(torch.rand(1, 3, 64, 64)), r18(torch.rand(1, 3, 64, 64))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref_out.items()}


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone.blocks=[1, 1, 1]"], "must be 4 block counts in 1..64"),
    (["model.backbone.blocks=[1, 0, 1, 1]"], "must be 4 block counts in 1..64"),
])
def test_bad_blocks_fail_at_load_naming_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as exc:
        rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", ["model.backbone.depth=18", *overrides])
    assert "model.backbone.blocks" in str(exc.value) and message in str(exc.value)


def test_blocks_that_do_not_fit_the_weights_fail_before_loading_them():
    from rcnn_lab.models.backbones import resnet_fpn

    with pytest.raises(ConfigError) as exc:  # no download tried: the check comes first
        resnet_fpn(depth=18, blocks=[1, 1, 1, 1], weights="imagenet")
    p = exc.value.problems[0]
    assert p.path == "blocks" and "resnet18's weights ([2, 2, 2, 2]); drop blocks or set weights: null" in p.message


def test_size_divisible_sets_the_batch_padding():
    images = [torch.rand(3, 128, 128)]
    padded = {}
    for div in (32, 16):
        exp = rcnn_lab.load_experiment(EXPERIMENTS / "quickstart.yaml", [f"model.transform.size_divisible={div}"])
        model = rcnn_lab.build_model(exp.variants[0].config.model).eval()
        batch, _ = model.transform(images)
        padded[div] = (tuple(batch.tensors.shape[-2:]), batch.image_sizes[0])
    assert padded == {32: ((128, 128), (112, 112)), 16: ((112, 112), (112, 112))}  # resized to min_size 112 either way


def test_size_divisible_must_be_positive():
    with pytest.raises(ConfigError) as exc:
        rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", ["model.transform.size_divisible=0"])
    assert "model.transform.size_divisible: must be positive, got 0" in str(exc.value)


def test_the_load_time_check_maps_a_fitting_weights_file_and_hands_a_plugin_none(tmp_path, monkeypatch):
    """check_model (validate, run --dry-run) gives resnet_fpn its weights file on the meta device: memory-mapped,
    compared, not loaded; a backbone registered without ``checks_weights_on_meta`` (a plugin's) is built without it."""
    from torchvision.models import resnet18

    from rcnn_lab.models.builder import check_model
    from rcnn_lab.registry import BACKBONES

    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(k.get("mmap", False)) or load(*a, **k))
    cfg = rcnn_lab.load_experiment(EXPERIMENTS / "base.yaml", ["model.backbone.depth=18",
                                                                f"model.backbone.weights={tmp_path / 'r18.pth'}"])
    reads.clear()  # loading checked it once already
    assert check_model(cfg.variants[0].config.model) == [] and reads == [True]
    seen = []

    @BACKBONES.register("weights_seen_test_plugin")
    def plugin(weights: str | None = None):
        seen.append(weights)
        return BACKBONES.get("resnet_fpn").factory(depth=18)

    try:
        spec = cfg.variants[0].config.model.backbone
        plugged = replace(cfg.variants[0].config.model, backbone=type(spec)("weights_seen_test_plugin",
                                                                              {"weights": str(tmp_path / "r18.pth")}))
        assert check_model(plugged) == [] and seen == [None] and reads == [True]
    finally:
        BACKBONES.unregister("weights_seen_test_plugin")
