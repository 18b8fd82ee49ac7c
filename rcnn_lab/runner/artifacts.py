"""Run artifacts: model summary, per-class metrics, loss-curve plot, optional checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine.hooks import Hook, Priority


def model_summary(model) -> str:
    from rcnn_lab.models.builder import count_parameters, parameter_groups

    lines = [f"parameters: {count_parameters(model):,}",
             f"trainable:  {sum(p.numel() for p in model.parameters() if p.requires_grad):,}", ""]
    lines += [f"{name:<28}{n:>14,}" for name, n in parameter_groups(model).items()]
    return "\n".join(lines) + "\n\n" + repr(model) + "\n"


def loss_curve(history: list[dict], title: str):
    """Matplotlib figure of the logged losses against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        its = [h["iteration"] for h in history]
        for key in [k for k in history[0] if k.startswith("loss_")] + ["total"]:
            ax.plot(its, [h[key] for h in history], label=key, lw=2 if key == "total" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_results(c, run_id: str, trainer, result, out: Path, log_checkpoint: bool) -> None:
    import matplotlib.pyplot as plt

    c.log_text(run_id, json.dumps(result.per_class, indent=2), "eval/per_class.json")
    c.log_text(run_id, json.dumps(result.metrics, indent=2), "eval/metrics.json")
    fig = loss_curve(result.history, trainer.config.name)
    c.log_figure(run_id, fig, "loss_curve.png")
    plt.close(fig)
    if log_checkpoint:
        final = ckpt.latest(ckpt.folder(out))
        if final is not None:
            c.log_artifact(run_id, str(final), "checkpoint")


class GradNormHook(Hook):
    """Adds the gradient-flow probe to the step record every N steps (``train.grad_probe_every``).

    Metrics ``grad_norm/LOSS/COMPONENT`` (see :mod:`rcnn_lab.probe`), computed on the step's batch
    after its optimizer step, before the hook that logs ``record.extra`` (``Priority.MEASURE``).
    """

    priority = Priority.MEASURE

    def __init__(self, every: int):
        self.every = every

    def after_step(self, trainer, record) -> None:
        if record.iteration % self.every:
            return
        from rcnn_lab.probe import grad_norms

        images, targets = trainer.last_batch
        norms = grad_norms(trainer.model, images, targets)
        for loss, comps in norms.items():
            for comp, value in comps.items():
                record.extra[f"grad_norm/{loss}/{comp}"] = value


def extra_hooks(run, client, run_id) -> list[Hook]:
    every = run.config.train.grad_probe_every
    return [GradNormHook(every)] if every else []
