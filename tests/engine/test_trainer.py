"""The training loop: exact resume, determinism, hooks, errors and evaluation wiring (tiny CPU runs)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine import trainer as trainer_module
from rcnn_lab.engine.hooks import Hook, StepRecord
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.engine.trainer import Trainer, TrainResult
from rcnn_lab.errors import ConfigError, TrainingError
from tests.conftest import EXPERIMENTS, TINY_MODEL

LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
ITERATIONS, CHECKPOINT_EVERY, BATCH = 4, 2, 2
LR, WARMUP = 0.01, 2


def tiny_config(tmp_path, *overrides: str):
    """A resnet18-FPN at 64 px on 8 shapes images: 4 iterations, checkpoints every 2, every step logged."""
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""base: {EXPERIMENTS / 'base.yaml'}
name: tiny
{TINY_MODEL}
data:
  train: {{type: shapes, split: train, num_images: 8, image_size: 64}}
  val: {{type: shapes, split: val, num_images: 4, image_size: 64}}
  batch_size: {BATCH}
train:
  iterations: {ITERATIONS}
  optimizer: {{type: sgd, lr: {LR}, momentum: 0.9, weight_decay: 1.0e-4}}
  lr_scheduler: {{type: multistep, milestones: [0.75], gamma: 0.1, warmup_iters: {WARMUP}}}
  log_every: 1
  checkpoint_every: {CHECKPOINT_EVERY}
  device: cpu
eval:
  batch_size: 4
""")
    return load_experiment(path, list(overrides)).variants[0].config


class Recorder(Hook):
    """Records every stage call; optionally interrupts after a given finished iteration."""

    def __init__(self, stop_after_step: int | None = None, stop_after_checkpoint: int | None = None):
        self.calls: list[tuple] = []
        self.stop_after_step, self.stop_after_checkpoint = stop_after_step, stop_after_checkpoint

    def before_train(self, trainer):
        self.calls.append(("before_train", trainer))

    def after_step(self, trainer, record):
        self.calls.append(("after_step", trainer, record))
        if record.iteration == self.stop_after_step:
            raise KeyboardInterrupt

    def after_eval(self, trainer, iteration, metrics, per_class):
        self.calls.append(("after_eval", trainer, iteration, dict(metrics), per_class))

    def after_checkpoint(self, trainer, iteration, path):
        self.calls.append(("after_checkpoint", trainer, iteration, path, path.is_file()))
        if iteration == self.stop_after_checkpoint:
            raise KeyboardInterrupt

    def after_train(self, trainer, result):
        self.calls.append(("after_train", trainer, result))

    def losses(self) -> list[dict[str, float]]:
        return [c[2].losses for c in self.calls if c[0] == "after_step"]


def _losses(history: list[dict]) -> list[tuple]:
    return [(h["iteration"], h["lr"], *(h[k] for k in sorted(LOSSES))) for h in history]


def _records(recorder: Recorder) -> list[StepRecord]:
    return [c[2] for c in recorder.calls if c[0] == "after_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run: (trainer, result, recorder)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    recorder = Recorder()
    trainer = Trainer(tiny_config(tmp), tmp / "out", hooks=[recorder], resume=True)
    return trainer, trainer.fit(), recorder


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A fresh run with the same config and seed, interrupted right after its first checkpoint: (out_dir, recorder)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    recorder = Recorder(stop_after_checkpoint=CHECKPOINT_EVERY)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp), tmp / "out", hooks=[recorder]).fit()
    return tmp / "out", recorder


def test_same_seed_gives_identical_losses(uninterrupted, interrupted):
    first = [r.losses for r in _records(interrupted[1])]
    assert len(first) == CHECKPOINT_EVERY
    assert first == [r.losses for r in _records(uninterrupted[2])[:CHECKPOINT_EVERY]]


def test_resume_after_interruption_is_exact(uninterrupted, interrupted, tmp_path):
    full_trainer, full, _ = uninterrupted
    out = interrupted[0]
    assert ckpt.latest(out / "checkpoints").name == f"iter_{CHECKPOINT_EVERY:07d}.pt"

    recorder = Recorder()
    trainer = Trainer(tiny_config(tmp_path), out, hooks=[recorder], resume=True)
    assert trainer.start_iteration == CHECKPOINT_EVERY
    result = trainer.fit()
    assert result.resumed_from == CHECKPOINT_EVERY
    assert [r.iteration for r in _records(recorder)] == list(range(CHECKPOINT_EVERY + 1, ITERATIONS + 1))
    # the checkpointed history plus the resumed steps equal the uninterrupted run's, bit for bit
    assert _losses(result.history) == _losses(full.history)
    full_state, state = full_trainer.model.state_dict(), trainer.model.state_dict()
    assert full_state.keys() == state.keys()
    for key in full_state:
        assert torch.equal(full_state[key], state[key]), key
    assert result.metrics["bbox_AP"] == full.metrics["bbox_AP"]
    assert result.metrics["segm_AP"] == full.metrics["segm_AP"]


def test_other_seed_differs_and_history_follows_log_every(uninterrupted, tmp_path):
    reference = _records(uninterrupted[2])
    recorder = Recorder(stop_after_step=3)
    trainer = Trainer(tiny_config(tmp_path, "train.seed=1", "train.log_every=2"), tmp_path / "out",
                      hooks=[recorder], resume=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    losses = recorder.losses()
    assert len(losses) == 3  # hooks see every step
    assert all(math.isfinite(v) for step in losses for v in step.values())
    assert all(a[k] != b.losses[k] for a, b in zip(losses, reference) for k in LOSSES)
    assert [h["iteration"] for h in trainer.history] == [2]  # history only every log_every


def test_hooks_see_stages_in_order_with_their_arguments(uninterrupted):
    trainer, result, recorder = uninterrupted
    stages = [(c[0], c[2] if c[0] in ("after_eval", "after_checkpoint") else None) for c in recorder.calls]
    steps = [("after_step", None)] * CHECKPOINT_EVERY
    assert stages == [("before_train", None), *steps, ("after_checkpoint", CHECKPOINT_EVERY), *steps,
                      ("after_checkpoint", ITERATIONS), ("after_eval", ITERATIONS), ("after_train", None)]
    assert all(c[1] is trainer for c in recorder.calls)

    records = _records(recorder)
    assert [r.iteration for r in records] == list(range(1, ITERATIONS + 1))
    for r in records:
        assert set(r.losses) == LOSSES and all(math.isfinite(v) for v in r.losses.values())
        assert r.total == pytest.approx(sum(r.losses.values()))
        assert 0 <= r.data_time < r.step_time
        assert r.peak_memory_mb > 0 and r.images == BATCH
    # linear warmup over 2 iterations from 0.001 x lr, then x0.1 from the milestone (0.75 x 4 = iteration 3)
    expected = [LR * 0.001, LR * (0.001 * 0.5 + 0.5), LR, LR * 0.1]
    assert [r.lr for r in records] == pytest.approx(expected)
    # every logged step (log_every: 1) is in the history with the record's values
    assert [h["iteration"] for h in result.history] == [r.iteration for r in records]
    for h, r in zip(result.history, records):
        assert (h["lr"], h["total"], h["data_time"], h["step_time"], h["peak_memory_mb"]) == (
            r.lr, r.total, r.data_time, r.step_time, r.peak_memory_mb)
        assert all(h[k] == r.losses[k] for k in LOSSES)

    checkpoints = [c for c in recorder.calls if c[0] == "after_checkpoint"]
    assert all(c[4] for c in checkpoints)  # the file exists when the hook runs
    assert [c[3].name for c in checkpoints] == [f"iter_{CHECKPOINT_EVERY:07d}.pt", f"iter_{ITERATIONS:07d}.pt"]
    assert not checkpoints[0][3].exists()  # only the newest checkpoint is kept

    (_, _, iteration, metrics, per_class), = [c for c in recorder.calls if c[0] == "after_eval"]
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"} <= metrics.keys()
    assert set(per_class) == {"bbox", "segm"}  # eval.per_class defaults to true
    assert set(per_class["bbox"]) == {c["name"] for c in trainer.val_set.categories}

    final = recorder.calls[-1][2]
    assert final is result and isinstance(result, TrainResult)
    assert result.iterations == ITERATIONS and result.resumed_from == 0 and result.train_time_s > 0
    assert {"bbox_AP", "segm_AP50", "train_time_s"} <= result.metrics.keys()
    assert all(0.0 <= result.metrics[k] <= 1.0 for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"))
    assert result.per_class == per_class


def test_non_finite_loss_stops_with_the_iteration_and_loss_names(tmp_path):
    recorder = Recorder()
    config = tiny_config(tmp_path, "train.optimizer.lr=1.0e+8", "train.lr_scheduler.warmup_iters=0",
                         "train.checkpoint_every=0")
    with pytest.raises(TrainingError) as info:
        Trainer(config, tmp_path / "out", hooks=[recorder], resume=False).fit()
    finished = len(recorder.losses())
    message = str(info.value)
    assert f"non-finite loss at iteration {finished + 1}:" in message
    named = {name for name in LOSSES if f"{name}=" in message}
    assert named and all(f"{name}=nan" in message or f"{name}=inf" in message for name in named)
    assert "learning rate" in message and "\n" not in message
    assert "enable train.clip_grad_norm" in message
    assert not any(c[0] == "after_train" for c in recorder.calls)


def test_non_finite_loss_hint_does_not_offer_clipping_that_is_on():
    from rcnn_lab.engine.trainer import nonfinite_hint

    assert "enable train.clip_grad_norm" in nonfinite_hint(SimpleNamespace(clip_grad_norm=None))
    hint = nonfinite_hint(SimpleNamespace(clip_grad_norm=10.0))
    assert "enable" not in hint and "train.clip_grad_norm (now 10)" in hint


def test_cuda_without_cuda_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config(tmp_path, "train.device=cuda"), tmp_path / "out")
    assert [p.path for p in info.value.problems] == ["train.device"]
    assert "CUDA is not available" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_eval_per_class_is_passed_to_evaluate(tmp_path, monkeypatch):
    import rcnn_lab.engine.evaluate as evaluate_module

    seen = []
    real = evaluate_module.evaluate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("per_class"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    config = tiny_config(tmp_path, "eval.per_class=false", "eval.iou_types=[bbox]", "eval.max_images=2")
    result = Trainer(config, tmp_path / "out", resume=False).evaluate(0)
    assert seen == [False]
    assert result.per_class == {}
    assert "bbox_AP" in result.metrics and "segm_AP" not in result.metrics


def test_eval_class_agnostic_adds_the_agnostic_metrics(tmp_path):
    config = tiny_config(tmp_path, "eval.class_agnostic=true", "eval.iou_types=[segm]", "eval.max_images=2")
    metrics = Trainer(config, tmp_path / "out", resume=False).evaluate(0).metrics
    assert [k for k in metrics if "agnostic" in k] == ["segm_agnostic_AP", "segm_agnostic_AP50", "segm_agnostic_AP75"]
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if "agnostic" in k)


@pytest.mark.parametrize("num_classes, categories", [(4, 5), (5, 5)])
def test_num_classes_must_cover_the_dataset(tmp_path, num_classes, categories):
    config = tiny_config(tmp_path, f"model.num_classes={num_classes}")
    with pytest.raises(ConfigError) as info:
        Trainer(config, tmp_path / "out")
    (problem,) = info.value.problems
    assert problem.path == "model.num_classes"
    assert f"{categories} categories" in problem.message
    assert f"set model.num_classes to {categories + 1}" in problem.message
    assert not (tmp_path / "out").exists()


def test_val_categories_must_match_train(tmp_path):
    config = tiny_config(tmp_path, "data.val.classes=[circle, square, triangle, ellipse, ring]")
    with pytest.raises(ConfigError) as info:
        Trainer(config, tmp_path / "out")
    assert [p.path for p in info.value.problems] == ["data.val"]
    assert "label 5" in str(info.value)


@pytest.mark.parametrize("amp, device, native, expected", [
    ("none", "cpu", True, None), ("bf16", "cuda", False, torch.bfloat16), ("fp16", "cuda", False, torch.float16),
    ("bf16", "cpu", True, torch.bfloat16), ("bf16", "cpu", False, None), ("fp16", "cpu", True, None),
])
def test_resolve_amp(amp, device, native, expected, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    assert trainer_module.resolve_amp(amp, torch.device(device)) is expected
    notice = capsys.readouterr().err
    assert ("training in float32" in notice) == (amp != "none" and expected is None)
    assert trainer_module.resolve_amp(amp, torch.device(device), notify=False) is expected  # other ranks: same dtype, silent
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("capability, flag, native", [("AVX512", True, True), ("AVX512", False, False),
                                                      ("AVX2", True, False), ("DEFAULT", True, False)])
def test_native_bf16_needs_the_cpus_flag_and_torchs_avx512_kernels(capability, flag, native, monkeypatch):
    """A CPU with AVX512-BF16 whose torch kernels are held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``) emulates bf16: float32."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flag)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert trainer_module.cpu_has_native_bf16() is native


def test_bf16_on_cpu_trains_under_autocast(tmp_path, monkeypatch, uninterrupted):
    """train.amp=bf16 on a CPU with native bf16 changes the losses (autocast is on) and stays finite (2 steps)."""
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: True)  # emulated where not native: slow, same maths
    config = tiny_config(tmp_path, "train.amp=bf16", "train.checkpoint_every=0", "train.iterations=2")
    result = Trainer(config, tmp_path / "out", resume=False).fit()
    fp32 = uninterrupted[1].history
    assert len(result.history) == 2 and result.iterations == 2
    assert all(math.isfinite(h[k]) for h in result.history for k in LOSSES)
    assert result.history[0]["loss_classifier"] != fp32[0]["loss_classifier"]
    assert result.history[0]["loss_classifier"] == pytest.approx(fp32[0]["loss_classifier"], rel=0.05)


def test_channels_last_on_cpu_trains_the_same_model_and_resumes_exactly(tmp_path, uninterrupted):
    """train.channels_last applies on CPU too: NHWC weights, NCHW's losses up to rounding, exact resume."""
    overrides = ("train.channels_last=true",)
    trainer = Trainer(tiny_config(tmp_path, *overrides), tmp_path / "full", resume=False)
    conv = trainer.model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    full = trainer.fit()
    nchw = uninterrupted[1].history
    assert len(full.history) == len(nchw) == ITERATIONS
    # the same forward and the same first update up to rounding; later steps of this tiny SGD run
    # (lr 0.01 from scratch) amplify the rounding differences (about 1 % by step 4), so only the
    # first two steps are compared
    for step in range(2):
        for k in LOSSES:
            assert full.history[step][k] == pytest.approx(nchw[step][k], rel=1e-4, abs=1e-5), (step, k)

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp_path, *overrides), tmp_path / "cut", hooks=[Recorder(stop_after_checkpoint=CHECKPOINT_EVERY)]).fit()
    resumed = Trainer(tiny_config(tmp_path, *overrides), tmp_path / "cut", resume=True)
    assert resumed.start_iteration == CHECKPOINT_EVERY
    assert resumed.model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert _losses(resumed.fit().history) == _losses(full.history)


class Quadratic(torch.nn.Module):
    """One loss, 0.5 * |w|^2, so its gradient is w (norm 5)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))

    def forward(self, images, targets=None):
        return {"loss_objectness": 0.5 * (self.w ** 2).sum()}


@pytest.mark.parametrize("clip, expected", [(10.0, [2.7, 3.6]), (1.0, [2.94, 3.92])])
def test_grad_scaler_unscales_before_clipping(tmp_path, clip, expected):
    """The fp16 path (a GradScaler; on CPU here): clip_grad_norm sees the true gradient, and the step is taken.

    Clipping the scaled gradient (norm 5 x 1024) instead would shrink every update to almost nothing.
    """
    config = tiny_config(tmp_path, f"train.clip_grad_norm={clip}", "train.checkpoint_every=0")
    trainer = Trainer(config, tmp_path / "out", hooks=[Recorder(stop_after_step=1)], resume=False)
    trainer.model = trainer.ddp_model = model = Quadratic()
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda it: 1.0)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert torch.allclose(model.w.detach(), torch.tensor(expected))  # w - 0.1 * (the gradient, clipped to norm clip)
    assert trainer.scaler.get_scale() == 1024.0  # finite gradients: no back-off (growth only after 2000 steps)
