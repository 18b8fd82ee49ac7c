"""Optimizers and per-iteration learning-rate schedules (with linear warmup)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from rcnn_lab.config.types import NonNegative, Positive
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.registry import LR_SCHEDULERS, OPTIMIZERS


def _split_decay(params, weight_decay: float, norm_weight_decay: float | None):
    if norm_weight_decay is None:
        return [{"params": [p for p in params if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": norm_weight_decay}]


@OPTIMIZERS.register("sgd")
def sgd(params, lr: Positive = 0.02, momentum: NonNegative = 0.9, weight_decay: NonNegative = 1e-4, nesterov: bool = False,
        norm_weight_decay: NonNegative | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (torchvision detection recipe: lr 0.02 for 16 images, wd 1e-4).

    ``fused``: torch's single-kernel update (CPU and CUDA); same maths, last-bit rounding differs.
    """
    return torch.optim.SGD(_split_decay(list(params), weight_decay, norm_weight_decay), lr=lr, momentum=momentum,
                           nesterov=nesterov, fused=fused or None)


@OPTIMIZERS.register("adamw")
def adamw(params, lr: Positive = 1e-4, betas: tuple[NonNegative, NonNegative] = (0.9, 0.999), weight_decay: NonNegative = 0.05,
          eps: Positive = 1e-8, norm_weight_decay: NonNegative | None = 0.0, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay; biases and norm weights undecayed by default).

    ``fused``: torch's single-kernel update (CPU and CUDA), several times faster than the default
    per-parameter loop on CPU (docs/benchmarks/optimizer.md); last-bit rounding differs.
    """
    return torch.optim.AdamW(_split_decay(list(params), weight_decay, norm_weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None)


def _warmup(it: int, warmup_iters: int, warmup_factor: float) -> float:
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return warmup_factor * (1 - alpha) + alpha


def _check_warmup(warmup_iters: int, warmup_factor: float) -> None:
    if warmup_iters < 0 or not 0 < warmup_factor <= 1:
        raise ConfigError([Problem("warmup_factor" if warmup_iters >= 0 else "warmup_iters",
                                   "warmup_iters must be >= 0 and warmup_factor in (0, 1]")])


@LR_SCHEDULERS.register("multistep")
def multistep(optimizer, total_iters: int, milestones: list[float] = (0.67, 0.89), gamma: float = 0.1,
              warmup_iters: int = 0, warmup_factor: float = 0.001) -> LambdaLR:
    """Linear warmup, then lr x gamma at each milestone (fractions of the run, e.g. [0.67, 0.89])."""
    _check_warmup(warmup_iters, warmup_factor)
    if any(not 0 < m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ConfigError([Problem("milestones", f"must be increasing fractions of train.iterations in (0, 1), got {list(milestones)}")])
    steps = [int(m * total_iters) for m in milestones]
    return LambdaLR(optimizer, lambda it: _warmup(it, warmup_iters, warmup_factor) * gamma ** sum(it >= s for s in steps))


@LR_SCHEDULERS.register("multistep_epochs", inject=("iters_per_epoch",))
def multistep_epochs(optimizer, total_iters: int, iters_per_epoch: int, milestones: list[int] = (16, 22), gamma: float = 0.1,
                     warmup_iters: int = 1000, warmup_factor: float = 0.001) -> LambdaLR:
    """torchvision's detection references: lr x gamma from each milestone epoch on (their
    ``MultiStepLR`` stepped per epoch) and, in epoch 0 only, a linear warmup from ``warmup_factor``
    over ``min(warmup_iters, iters_per_epoch - 1)`` iterations (``train_one_epoch``'s ``LinearLR``)."""
    _check_warmup(warmup_iters, warmup_factor)
    if any(m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ConfigError([Problem("milestones", f"must be increasing epoch numbers >= 1, got {list(milestones)}")])
    per_epoch = max(1, iters_per_epoch)
    warmup = min(warmup_iters, per_epoch - 1)
    return LambdaLR(optimizer, lambda it: _warmup(it, warmup, warmup_factor) * gamma ** sum(it // per_epoch >= m for m in milestones))


@LR_SCHEDULERS.register("cosine")
def cosine(optimizer, total_iters: int, min_factor: float = 0.0, warmup_iters: int = 0, warmup_factor: float = 0.001) -> LambdaLR:
    """Linear warmup, then cosine decay to min_factor x lr at the end of the run."""
    _check_warmup(warmup_iters, warmup_factor)

    def factor(it: int) -> float:
        span = max(1, total_iters - warmup_iters)
        t = min(1.0, max(0, it - warmup_iters) / span)
        return _warmup(it, warmup_iters, warmup_factor) * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t)))

    return LambdaLR(optimizer, factor)


@LR_SCHEDULERS.register("constant")
def constant(optimizer, total_iters: int, warmup_iters: int = 0, warmup_factor: float = 0.001) -> LambdaLR:
    """Linear warmup, then a constant learning rate."""
    _check_warmup(warmup_iters, warmup_factor)
    return LambdaLR(optimizer, lambda it: _warmup(it, warmup_iters, warmup_factor))
