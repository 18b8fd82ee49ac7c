"""``train.grad_probe_every``: the runner logs the gradient-flow probe to MLflow every N steps."""

from __future__ import annotations

import pytest

from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.probe import LOSSES
from rcnn_lab.runner.plan import make_plan
from rcnn_lab.runner.sweep import run_plan
from tests.runner.conftest import tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VARIANTS = """  backprop:
    model.rpn.proposal_gradient: backprop
    model.roi_heads.box_pooler: {type: differentiable_roi_align, output_size: 7, sampling_ratio: 2}
    model.roi_heads.mask_pooler: {type: differentiable_roi_align, output_size: 14, sampling_ratio: 2}
"""


def test_grad_probe_every_logs_grad_norm_metrics(tmp_path, new_store):
    from mlflow import MlflowClient

    uri = new_store(tmp_path)
    exp_file = tiny_experiment(tmp_path, uri, variants=VARIANTS, iterations=4,
                               train="  grad_probe_every: 2\n", name="grad_probe")
    exp = load_experiment(exp_file)
    [outcome] = run_plan(exp, make_plan(exp), root=tmp_path / "runs", progress=False, echo=lambda *a: None)
    assert outcome.status == "FINISHED", outcome

    c = MlflowClient(uri)
    metrics = c.get_run(outcome.run_id).data.metrics
    probed = {k for k in metrics if k.startswith("grad_norm/")}
    assert len(probed) == len(LOSSES) * 9  # every loss x component (resnet FPN, 3 RPN-head parts, 4 RoI-head parts)
    history = c.get_metric_history(outcome.run_id, "grad_norm/loss_classifier/rpn.head.bbox_pred")
    assert sorted(m.step for m in history) == [2, 4]  # every 2 of 4 iterations
    # backprop: the classifier loss reaches the RPN's bbox_pred (box and mask losses do too, but only
    # through positive proposals, which an untrained RPN may not have: then only constant GT boxes are)
    assert all(m.value > 0 for m in history)
    assert all(m.value == 0 for m in c.get_metric_history(outcome.run_id, "grad_norm/loss_mask/rpn.head.cls_logits"))
    assert [m.step for m in c.get_metric_history(outcome.run_id, "loss_box_reg")] == [1, 2, 3, 4]
    assert (tmp_path / "runs" / "outputs" / "grad_probe").is_dir()  # outputs under the given root


def test_probing_does_not_change_the_training_trajectory(tmp_path):
    """Same losses and weights with and without the probe: it restores BatchNorm statistics and the RNG."""
    import torch

    from rcnn_lab.engine.hooks import Hook
    from rcnn_lab.engine.trainer import Trainer
    from rcnn_lab.runner.artifacts import GradNormHook

    class Losses(Hook):
        def __init__(self):
            self.seen, self.extra = [], {}

        def after_step(self, trainer, record):
            self.seen.append(record.losses)
            self.extra.update(record.extra)

    config = load_experiment(tiny_experiment(tmp_path, None, iterations=3)).variants[0].config
    runs = {}
    for name, hooks in (("plain", []), ("probed", [GradNormHook(1)])):
        spy = Losses()
        trainer = Trainer(config, tmp_path / name, hooks=[*hooks, spy], resume=False)
        trainer.fit()
        runs[name] = (spy, trainer.model.state_dict())
    (plain, w_plain), (probed, w_probed) = runs["plain"], runs["probed"]
    assert len(probed.extra) == len(LOSSES) * 9 and not plain.extra
    assert plain.seen == probed.seen
    assert all(torch.equal(w_plain[k], w_probed[k]) for k in w_plain)
