"""``rcnn-lab probe``: JSON and table output of the gradient-flow probe; bad arguments exit 2."""

from __future__ import annotations

import json

import pytest

from rcnn_lab.cli.main import main
from rcnn_lab.probe import LOSSES
from tests.conftest import EXPERIMENTS

ABLATION = str(EXPERIMENTS / "detach_ablation.yaml")
COMPONENTS = ["backbone.body", "backbone.fpn", "rpn.head.conv", "rpn.head.cls_logits", "rpn.head.bbox_pred",
              "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor"]
TINY = [
    "model.transform.min_size=64", "model.transform.max_size=64",
    "data.train.image_size=64", "data.train.num_images=4", "data.batch_size=2",
    "model.rpn.post_nms_top_n.train=50", "model.roi_heads.batch_size_per_image=32",
    "model.roi_heads.box_head={type: two_mlp, representation_size: 64}",
    "model.roi_heads.mask_head={type: conv_stack, layers: [32], dilation: 1}",
    "model.roi_heads.mask_predictor={type: mask_rcnn, dim_reduced: 32}",
    # at initialisation few proposals overlap an object by IoU 0.5; if none does, every positive RoI is an
    # appended GT box and loss_box_reg / loss_mask send the RPN exactly 0 even in backprop mode (see
    # docs/proposal_gradient.md); a lower threshold makes proposals positive whatever the initial weights
    "model.roi_heads.fg_iou_thresh=0.2", "model.roi_heads.bg_iou_thresh=0.2",
]
SETS = [a for s in TINY for a in ("--set", s)]


def test_json_has_every_variant_loss_and_component(capsys):
    assert main(["probe", ABLATION, "--steps", "1", "--json", *SETS]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"] == 1
    assert [v["name"] for v in data["variants"]] == ["detach", "backprop"]
    norms = {v["name"]: v["grad_norms"] for v in data["variants"]}
    for v in norms.values():
        assert list(v) == list(LOSSES) and all(list(v[loss]) == COMPONENTS for loss in LOSSES)
    for loss in ("loss_classifier", "loss_box_reg", "loss_mask"):
        assert norms["detach"][loss]["rpn.head.bbox_pred"] == 0.0
        assert norms["backprop"][loss]["rpn.head.bbox_pred"] > 0


def test_table_has_a_row_per_component_and_a_column_per_loss(capsys):
    assert main(["probe", ABLATION, "--variant", "backprop", *SETS]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("=== backprop:")
    assert lines[1].split() == ["component", *LOSSES]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == COMPONENTS
    assert all(len(r) == 1 + len(LOSSES) for r in rows)
    bbox_pred = dict(zip(LOSSES, rows[COMPONENTS.index("rpn.head.bbox_pred")][1:]))
    assert bbox_pred["loss_objectness"] == "0" and float(bbox_pred["loss_box_reg"]) > 0


@pytest.mark.parametrize("args, words", [
    (["--variant", "nope"], ["no variant 'nope'", "variants: detach, backprop", "detach_ablation.yaml"]),
    (["--variant", "detatch"], ["did you mean 'detach'?"]),
    (["--steps", "0"], ["--steps", "must be >= 1"]),
    (["--set", "model.rpn.proposal_gradient=sideways"], ["model.rpn.proposal_gradient"]),
])
def test_bad_arguments_exit_2_before_probing(capsys, args, words):
    assert main(["probe", ABLATION, *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) >= 1
    for w in words:
        assert w in err, err
