"""Gradient-flow probe: the gradient norm each loss sends into each component group.

For every loss (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``,
``loss_mask``) separately, ``torch.autograd.grad`` of that loss alone with respect to each
component's parameters; the L2 norm over the component is reported. One forward pass serves all
losses. The probe leaves the model as it found it: BatchNorm statistics and RNG state restored.
"""

from __future__ import annotations

import math

import torch

from rcnn_lab.models.builder import component_modules

LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def grad_norms(model, images, targets) -> dict[str, dict[str, float]]:
    """{loss: {component: ||d loss / d params(component)||_2}} for one batch in training mode."""
    groups = {name: [p for p in mod.parameters() if p.requires_grad] for name, mod in component_modules(model).items()}
    groups = {k: v for k, v in groups.items() if v}
    buffers = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if not isinstance(v, torch.nn.Parameter)}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    model.train()
    try:
        loss_dict = model(images, targets)
        flat = [p for ps in groups.values() for p in ps]
        out: dict[str, dict[str, float]] = {}
        names = [k for k in LOSSES if k in loss_dict] + [k for k in loss_dict if k not in LOSSES]
        for i, name in enumerate(names):
            grads = torch.autograd.grad(loss_dict[name], flat, retain_graph=i < len(names) - 1, allow_unused=True)
            it = iter(grads)
            out[name] = {}
            for comp, params in groups.items():
                sq = 0.0
                for _ in params:
                    g = next(it)
                    if g is not None:
                        sq += float(g.detach().float().pow(2).sum())
                out[name][comp] = math.sqrt(sq)
        return out
    finally:
        model.load_state_dict(buffers, strict=False)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)


def probe(config, steps: int = 1) -> dict[str, dict[str, float]]:
    """Build the variant, then for ``steps`` training steps probe each batch and train on it.

    Returns the per-loss, per-component norms averaged over the steps.
    """
    import tempfile

    from rcnn_lab.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, tmp, resume=False)
    model, device = trainer.model, trainer.device
    stream = iter(trainer.train_loader)
    total: dict[str, dict[str, float]] = {}
    for _ in range(steps):
        images, targets = next(stream)
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        norms = grad_norms(model, images, targets)
        for loss, comps in norms.items():
            for comp, v in comps.items():
                total.setdefault(loss, {}).setdefault(comp, 0.0)
                total[loss][comp] += v / steps
        model.train()
        loss = sum(model(images, targets).values())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
    return total
