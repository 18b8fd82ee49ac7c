from __future__ import annotations

import json

from torchvision.models.detection import maskrcnn_resnet50_fpn

from rcnn_lab.cli.main import main
from tests.conftest import EXPERIMENTS, FIXTURES


def test_validate_prints_table_and_exits_zero(capsys):
    assert main(["validate", str(EXPERIMENTS / "anchors_ablation.yaml")]) == 0
    out = capsys.readouterr().out
    assert "variant" in out and "parameters" in out and "model.anchor_generator" in out


def test_validate_bad_file_exits_2_with_one_line_per_problem(capsys):
    assert main(["validate", str(FIXTURES / "configs" / "wrong_type.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all("wrong_type.yaml" in line for line in err)
    assert any("model.num_classes" in line for line in err)


def test_bad_override_flag_exits_2(capsys):
    assert main(["validate", str(EXPERIMENTS / "base.yaml"), "--set", "model.rpn.nms_thresh"]) == 2
    assert "dotted.key=value" in capsys.readouterr().err


def test_inspect_json_anchor_counts_match_torchvision(capsys):
    assert main(["inspect", str(EXPERIMENTS / "base.yaml"), "--image-size", "800", "1088", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    v = data["variants"][0]
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    assert v["name"] == "default" and v["parameters"] == sum(p.numel() for p in reference.parameters())
    a = v["anchors"]
    # 800x1088 -> feature maps 200x272, 100x136, 50x68, 25x34, 13x17 with 3 anchors each
    per_level = [3 * 200 * 272, 3 * 100 * 136, 3 * 50 * 68, 3 * 25 * 34, 3 * 13 * 17]
    assert [lv["anchors"] for lv in a["per_level"]] == per_level
    assert a["total"] == sum(per_level)
    assert a["cell_anchors"][0] == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
    assert v["components"]["rpn.head.bbox_pred"] == 256 * 12 + 12
    assert [lv["stride"] for lv in a["per_level"]] == [[4, 4], [8, 8], [16, 16], [32, 32], [61, 64]]


def test_inspect_text_prints_each_level_stride_as_torchvision_does(capsys):
    # torchvision's AnchorGenerator: strides = (padded_h // feature_h, padded_w // feature_w); the
    # max-pooled level of an 800x1088 image is 13x17, so (61, 64), not one number
    assert main(["inspect", str(EXPERIMENTS / "base.yaml"), "--image-size", "800", "1088"]) == 0
    out = capsys.readouterr().out
    assert "13x17   stride (61, 64)" in out and "200x272  stride (4, 4)" in out


def test_inspect_counts_real_anchor_generator_output(capsys):
    import torch
    from torchvision.models.detection.image_list import ImageList

    import rcnn_lab

    assert main(["inspect", str(EXPERIMENTS / "quickstart.yaml"), "--json", "--image-size", "100", "150"]) == 0
    reported = json.loads(capsys.readouterr().out)["variants"][0]["anchors"]
    exp = rcnn_lab.load_experiment(EXPERIMENTS / "quickstart.yaml")
    model = rcnn_lab.build_model(exp.variants[0].config.model).eval()
    images, _ = model.transform([torch.zeros(3, 100, 150)])
    feats = list(model.backbone(images.tensors).values())
    anchors = model.rpn.anchor_generator(ImageList(images.tensors, images.image_sizes), feats)
    assert reported["total"] == anchors[0].shape[0]


def test_components_lists_every_family(capsys):
    assert main(["components", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    two_mlp = next(c for c in data["box_head"]["components"] if c["name"] == "two_mlp")
    assert {"name": "representation_size", "type": "int", "required": False, "default": 1024} in two_mlp["params"]
    assert two_mlp["summary"].startswith("TwoMLPHead")
    assert "light_separable" in [c["name"] for c in data["mask_head"]["components"]]
    assert main(["components", "--family", "box_hed"]) == 2
    assert "did you mean 'box_head'" in capsys.readouterr().err


def test_validate_says_what_it_does_not_check(capsys):
    assert main(["validate", str(EXPERIMENTS / "base.yaml")]) == 0
    assert "not checked: dataset files and device availability (validate --data checks them)" in capsys.readouterr().out


def test_validate_data_runs_runs_preflight(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {EXPERIMENTS / 'base.yaml'}\nname: t\n"
                   "data: {train: {type: coco, images: nowhere, annotations: none.json}}\n")
    assert main(["validate", str(exp)]) == 0  # the file is valid ...
    capsys.readouterr()
    assert main(["validate", str(exp), "--data"]) == 2  # ... but its data is missing, as run would find
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exp.yaml: data.train.images: folder 'nowhere' does not exist" in err[0]
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"base: {EXPERIMENTS / 'base.yaml'}\nname: t\ntrain: {{device: cpu}}\n"
                  "data: {train: {type: shapes, split: train, num_images: 2}, val: {type: shapes, split: val, num_images: 2}}\n"
                  "model: {num_classes: 6}\n")
    assert main(["validate", str(ok), "--data"]) == 0
    assert "datasets opened and device checked" in capsys.readouterr().out


def test_validate_prints_warnings_on_stderr(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {EXPERIMENTS / 'base.yaml'}\nname: t\nseeds: [0, 0]\n")
    assert main(["validate", str(exp)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rcnn-lab validate: warning: {exp}: seeds: 0 listed more than once; each seed runs once"]


def test_validate_counts_the_parameters_of_the_model_with_its_weights(capsys, monkeypatch):
    """With ImageNet body weights the model has torchvision's FrozenBatchNorm2d body (affine terms are buffers):
    validate counts that model, as many as torchvision's maskrcnn_resnet50_fpn(weights=COCO_V1) has, and downloads
    nothing to count it."""
    import torch
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(AssertionError("download")))
    assert main(["validate", str(EXPERIMENTS / "base.yaml"), "--set", "model.backbone.weights=imagenet"]) == 0
    assert f"default *  {MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta['num_params']:,}  " in capsys.readouterr().out


def test_validate_counts_each_variant_on_the_model_the_load_built_to_check_it(capsys, monkeypatch):
    """One meta-device build per variant (a 200-variant ResNet-50 experiment built each twice: 19.5 -> 15.1 s),
    and per variant the count of its own model: the anchors ablation's variants differ in their RPN head."""
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.models import builder

    exp = load_experiment(EXPERIMENTS / "anchors_ablation.yaml")
    expected = {v.name: builder.count_parameters(builder.build_model(builder.meta_config(v.config.model))) for v in exp.variants}
    assert len(set(expected.values())) > 1
    built, real = [], builder.build_model
    monkeypatch.setattr(builder, "build_model", lambda cfg, *a, **k: built.append(cfg) or real(cfg, *a, **k))
    assert main(["validate", str(EXPERIMENTS / "anchors_ablation.yaml")]) == 0
    out = capsys.readouterr().out
    assert len(built) == len(exp.variants)
    for name, params in expected.items():
        assert any(line.split()[0] == name and f"{params:,}" in line.split() for line in out.splitlines()), (name, out)
