"""Optimizers and learning-rate schedules: documented lr values, parameter groups, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rcnn_lab.config.types import Spec
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.registry import LR_SCHEDULERS, OPTIMIZERS
from tests.conftest import EXPERIMENTS

BASE_LR = 0.02


def lrs(scheduler: dict, total: int, base_lr: float = BASE_LR) -> list[float]:
    """The lr each of ``total`` iterations trains with (read before ``scheduler.step()``, as the trainer does)."""
    param = nn.Parameter(torch.zeros(2))
    opt = OPTIMIZERS.build(Spec("sgd", {"lr": base_lr}), "train.optimizer", params=[param])
    kwargs = {k: v for k, v in scheduler.items() if k != "type"}
    sched = LR_SCHEDULERS.build(Spec(scheduler["type"], kwargs), "train.lr_scheduler", optimizer=opt, total_iters=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def warmup(it: int, iters: int, factor: float) -> float:
    """torchvision's linear warmup: factor at iteration 0, rising linearly to 1 at ``iters``."""
    if it >= iters:
        return 1.0
    return factor + (1 - factor) * it / iters


def test_multistep_with_warmup_and_fractional_milestones():
    total, w, wf, gamma = 200, 10, 0.001, 0.1
    got = lrs({"type": "multistep", "milestones": [0.5, 0.75], "gamma": gamma, "warmup_iters": w, "warmup_factor": wf}, total)
    steps = [100, 150]  # 0.5 and 0.75 of 200 iterations
    for it in (0, 1, 5, 9, 10, 99, 100, 101, 149, 150, 199):
        expected = BASE_LR * warmup(it, w, wf) * gamma ** sum(it >= s for s in steps)
        assert got[it] == pytest.approx(expected, rel=1e-12), it
    assert got[0] == pytest.approx(BASE_LR * wf)
    assert got[10] == pytest.approx(BASE_LR) and got[99] == pytest.approx(BASE_LR)
    assert got[100] == pytest.approx(BASE_LR * 0.1) and got[150] == pytest.approx(BASE_LR * 0.01)
    assert got[1:10] == sorted(got[1:10])  # warmup rises monotonically


def test_multistep_milestones_are_fractions_of_the_run():
    short = lrs({"type": "multistep", "milestones": [0.5]}, 10)
    long = lrs({"type": "multistep", "milestones": [0.5]}, 100)
    assert short.index(min(short)) == 5 and long.index(min(long)) == 50


@pytest.mark.parametrize("min_factor, w", [(0.0, 0), (0.1, 20)])
def test_cosine_with_warmup(min_factor, w):
    total, wf = 120, 0.01
    got = lrs({"type": "cosine", "min_factor": min_factor, "warmup_iters": w, "warmup_factor": wf}, total)
    for it in (0, 1, w // 2, w, w + 1, (total + w) // 2, total - 2, total - 1):
        t = max(0, it - w) / (total - w)
        expected = BASE_LR * warmup(it, w, wf) * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
        assert got[it] == pytest.approx(expected, rel=1e-12), it
    assert got[w] == pytest.approx(BASE_LR)
    assert got[(total + w) // 2] == pytest.approx(BASE_LR * (min_factor + (1 - min_factor) / 2))  # half way
    decay = got[w:]
    assert decay == sorted(decay, reverse=True) and decay[-1] > BASE_LR * min_factor
    assert decay[-1] == pytest.approx(BASE_LR * min_factor, abs=BASE_LR * 1e-3)  # ends at min_factor x lr


def test_constant_with_warmup():
    got = lrs({"type": "constant", "warmup_iters": 4, "warmup_factor": 0.5}, 10)
    assert got == pytest.approx([BASE_LR * (0.5 + 0.5 * i / 4) for i in range(4)] + [BASE_LR] * 6)


def test_scheduler_state_round_trips():
    """A restored scheduler continues the schedule (what checkpoint resume relies on)."""
    spec = Spec("multistep", {"milestones": [0.5], "warmup_iters": 3})
    p = nn.Parameter(torch.zeros(1))
    opt = OPTIMIZERS.build(Spec("sgd", {}), "", params=[p])
    sched = LR_SCHEDULERS.build(spec, "", optimizer=opt, total_iters=10)
    for _ in range(4):
        opt.step()
        sched.step()
    p2 = nn.Parameter(torch.zeros(1))
    opt2 = OPTIMIZERS.build(Spec("sgd", {}), "", params=[p2])
    sched2 = LR_SCHEDULERS.build(spec, "", optimizer=opt2, total_iters=10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(6):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_sgd_param_groups():
    m = Tiny()
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt = OPTIMIZERS.build(Spec("sgd", {"lr": 0.1, "momentum": 0.8, "weight_decay": 1e-3, "nesterov": True}), "", params=m.parameters())
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups
    assert _ids(group["params"]) == _ids(trainable)  # frozen parameters are left out
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.8, 1e-3, True)

    opt = OPTIMIZERS.build(Spec("sgd", {"weight_decay": 1e-3, "norm_weight_decay": 0.0}), "", params=m.parameters())
    decay, no_decay = opt.param_groups
    assert _ids(decay["params"]) == _ids([m.conv.weight, m.fc.weight]) and decay["weight_decay"] == 1e-3
    assert _ids(no_decay["params"]) == _ids([m.conv.bias, m.norm.weight, m.norm.bias, m.fc.bias])
    assert no_decay["weight_decay"] == 0.0


def test_adamw_param_groups():
    m = Tiny()
    opt = OPTIMIZERS.build(Spec("adamw", {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6}), "", params=m.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups  # biases and norm weights undecayed by default
    assert _ids(decay["params"]) == _ids([m.conv.weight, m.fc.weight]) and decay["weight_decay"] == 0.05
    assert _ids(no_decay["params"]) == _ids([m.conv.bias, m.norm.weight, m.norm.bias, m.fc.bias])
    assert no_decay["weight_decay"] == 0.0
    assert (decay["lr"], tuple(decay["betas"]), decay["eps"]) == (3e-4, (0.8, 0.9), 1e-6)
    before = m.fc.weight.detach().clone()
    m.fc(torch.ones(1, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, m.fc.weight)


@pytest.mark.parametrize("name, kwargs", [("sgd", {"lr": 0.1, "momentum": 0.9}), ("adamw", {"lr": 1e-2})])
def test_fused_update_matches_the_per_parameter_loop(name, kwargs):
    def train(fused: bool) -> tuple[Tiny, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = Tiny()
        opt = OPTIMIZERS.build(Spec(name, {**kwargs, "fused": fused}), "", params=m.parameters())
        data = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            opt.zero_grad()
            # no BatchNorm here: it leaves conv.bias a ~0 gradient whose rounding noise Adam amplifies
            m.fc(m.conv(data).relu().mean((2, 3))).square().sum().backward()
            opt.step()
        return m, opt

    (plain, plain_opt), (fused, fused_opt) = train(False), train(True)
    assert fused_opt.defaults["fused"] and not plain_opt.defaults["fused"]
    for (key, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    assert not torch.equal(plain.conv.weight, Tiny().conv.weight)  # it did train


@pytest.mark.parametrize("family, spec, key, hint", [
    (OPTIMIZERS, {"type": "sgd", "lrr": 0.1}, "train.optimizer.lrr", "did you mean 'lr'"),
    (OPTIMIZERS, {"type": "adamw", "momentum": 0.9}, "train.optimizer.momentum", "valid: lr, betas"),
    (OPTIMIZERS, {"type": "sgd", "params": []}, "train.optimizer.params", "set by the model builder"),
    (LR_SCHEDULERS, {"type": "cosine", "milestones": [0.5]}, "train.lr_scheduler.milestones", "valid: min_factor"),
    (LR_SCHEDULERS, {"type": "multistep", "total_iters": 5}, "train.lr_scheduler.total_iters", "set by the model builder"),
    (LR_SCHEDULERS, {"type": "multistep", "milestones": "half"}, "train.lr_scheduler.milestones", "list"),
])
def test_bad_arguments_name_the_dotted_path(family, spec, key, hint):
    problems: list[Problem] = []
    path = "train.optimizer" if family is OPTIMIZERS else "train.lr_scheduler"
    family.check_spec(spec, path, problems)
    assert [p.path for p in problems] == [key]
    assert hint in problems[0].message


def test_bad_arguments_in_yaml_name_file_and_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(f"base: {EXPERIMENTS / 'quickstart.yaml'}\ntrain:\n  optimizer: {{type: sgd, lr: 0.01, wd: 0.1}}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{path.resolve()}: train.optimizer.wd: unknown argument for optimizer 'sgd'")


@pytest.mark.parametrize("kwargs, key", [
    ({"milestones": [0.9, 0.5]}, "train.lr_scheduler.milestones"),
    ({"milestones": [1.5]}, "train.lr_scheduler.milestones"),
    ({"warmup_iters": -1}, "train.lr_scheduler.warmup_iters"),
    ({"warmup_factor": 0.0}, "train.lr_scheduler.warmup_factor"),
])
def test_bad_schedule_values_name_the_dotted_path(kwargs, key):
    opt = OPTIMIZERS.build(Spec("sgd", {}), "", params=[nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError) as info:
        LR_SCHEDULERS.build(Spec("multistep", kwargs), "train.lr_scheduler", optimizer=opt, total_iters=10)
    assert [p.path for p in info.value.problems] == [key]


def test_multistep_epochs_follows_the_reference_schedulers():
    """torchvision references: LinearLR(1/1000, min(1000, B - 1)) stepped per iteration in epoch 0,
    MultiStepLR(milestones in epochs) stepped after each epoch; both multiply the lr."""
    per_epoch, epochs, milestones = 4, 5, [2, 4]
    param = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    multistep = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    expected = []
    for epoch in range(epochs):
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / 1000, total_iters=min(1000, per_epoch - 1)) if epoch == 0 else None
        for _ in range(per_epoch):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            if warm is not None:
                warm.step()
        multistep.step()
    param = nn.Parameter(torch.zeros(2))
    opt = OPTIMIZERS.build(Spec("sgd", {"lr": BASE_LR}), "train.optimizer", params=[param])
    sched = LR_SCHEDULERS.build(Spec("multistep_epochs", {"milestones": milestones}), "train.lr_scheduler", optimizer=opt,
                                total_iters=per_epoch * epochs, iters_per_epoch=per_epoch)
    got = []
    for _ in range(per_epoch * epochs):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[3] == pytest.approx(BASE_LR) and got[8] == pytest.approx(BASE_LR / 10) and got[16] == pytest.approx(BASE_LR / 100)
    with pytest.raises(ConfigError, match="increasing epoch numbers"):
        LR_SCHEDULERS.build(Spec("multistep_epochs", {"milestones": [3, 2]}), "train.lr_scheduler", optimizer=opt,
                            total_iters=10, iters_per_epoch=2)
