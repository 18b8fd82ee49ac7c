"""Gradient-flow probe: the gradient norm each loss sends into each component group.

For every loss (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``,
``loss_mask``) separately, ``torch.autograd.grad`` of that loss alone with respect to each
component's trainable parameters; the L2 norm over the component is reported (0.0 where the loss
does not reach the component at all). One training-mode forward pass serves all losses.
Components are those of :func:`rcnn_lab.models.builder.component_modules`: ``backbone.body``,
``backbone.fpn``, ``rpn.head.conv``, ``rpn.head.cls_logits``, ``rpn.head.bbox_pred``,
``roi_heads.box_head``, ``roi_heads.box_predictor``, ``roi_heads.mask_head``,
``roi_heads.mask_predictor``; components without trainable parameters are left out.
"""

from __future__ import annotations

import math
import random

import torch

from rcnn_lab.models.builder import component_modules

LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def grad_norms(model, images, targets) -> dict[str, dict[str, float]]:
    """``{loss: {component: ||d loss / d params(component)||_2}}`` for one batch in training mode.

    Side-effect free: parameters and their ``.grad`` are not touched (``autograd.grad``), and the
    buffers (BatchNorm running statistics), the RNG state (proposal sampling draws from it) and
    the train/eval mode are restored before returning.
    """
    groups = {name: [p for p in mod.parameters() if p.requires_grad] for name, mod in component_modules(model).items()}
    groups = {k: v for k, v in groups.items() if v}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            loss_dict = model(images, targets)
        flat = [p for ps in groups.values() for p in ps]
        names = [k for k in LOSSES if k in loss_dict] + [k for k in loss_dict if k not in LOSSES]
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(names):
            grads = iter(torch.autograd.grad(loss_dict[name], flat, retain_graph=i < len(names) - 1, allow_unused=True))
            out[name] = {}
            for comp, params in groups.items():
                sq = [g.detach().float().pow(2).sum() for g in (next(grads) for _ in params) if g is not None]
                out[name][comp] = math.sqrt(float(torch.stack(sq).sum())) if sq else 0.0
        return out
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)


def probe(config, steps: int = 1) -> dict[str, dict[str, float]]:
    """Probe a freshly built model of ``config`` (a ``RunConfig``) on ``steps`` training batches.

    Builds the model, optimizer, scheduler and training stream as the trainer does (seeded by
    ``train.seed``); probes batch 1, trains on it (``Trainer.step`` in float32, with
    ``train.clip_grad_norm`` if set), probes batch 2, and so on: ``steps`` probes and
    ``steps - 1`` training steps. Returns the norms averaged over the probes. Writes nothing, and
    the caller's RNG state (torch, Python ``random``) is restored.
    """
    import tempfile
    from dataclasses import replace

    from rcnn_lab.engine.trainer import Trainer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    py_rng, rng = random.getstate(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    fp32 = replace(config, train=replace(config.train, amp="none"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(fp32, tmp, resume=False)  # writes nothing until a checkpoint
        stream = iter(trainer.train_loader)
        total: dict[str, dict[str, float]] = {}
        for step in range(1, steps + 1):
            images, targets = trainer.to_device(*next(stream))
            for loss, comps in grad_norms(trainer.model, images, targets).items():
                for comp, v in comps.items():
                    total.setdefault(loss, {}).setdefault(comp, 0.0)
                    total[loss][comp] += v / steps
            if step == steps:
                break
            trainer.model.train()
            trainer.step(images, targets, step)
        return total
    finally:
        random.setstate(py_rng)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
