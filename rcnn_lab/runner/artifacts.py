"""Run artifacts: model summary, per-class metrics, saved detections, cost metrics, loss-curve plot, optional checkpoint."""

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


WEIGHTS_ARTIFACT = "weights.txt"  # model.weights: every tensor, loaded or kept fresh


def log_weights(journal, report) -> None:
    """``model.weights``' load report: its summary and identity as tags, the full list as an artifact."""
    from rcnn_lab.runner import tags

    journal.tags({tags.WEIGHTS: report.summary()[:5000], tags.WEIGHTS_IDENTITY: report.identity[:5000]})
    journal.text(report.as_text(), WEIGHTS_ARTIFACT)


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): early points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_curve(history: list[dict], title: str, smoothing: float = 0.9):
    """Matplotlib figure of the logged losses against iterations, titled ``title`` (the run: variant, seed, experiment):
    each loss smoothed (EMA ``smoothing``) over its raw values drawn faint, log scale, legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    if history:
        its = [h["iteration"] for h in history]
        keys = [k for k in history[0] if k.startswith("loss_")] + ["total"]
        for i, key in enumerate(keys):
            raw = [max(h[key], 1e-12) for h in history]  # log scale: a zero loss stays on the chart
            colour = "black" if key == "total" else f"C{i}"
            ax.plot(its, raw, color=colour, alpha=0.2, lw=0.8)
            ax.plot(its, ema(raw, smoothing), color=colour, label=key, lw=2 if key == "total" else 1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{title}\nlosses: EMA {smoothing:g} (raw values faint)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def cost_metrics(trainer, result) -> dict[str, float]:
    """Cost next to accuracy: ``params``, ``gflops`` (one inference forward at the configured image size,
    ``engine.cost``), ``peak_memory_mb`` (training peak: CUDA allocator, or process max RSS on CPU) and
    ``images_per_s`` (training images per second of the whole run: iterations x batch x ranks / train time)."""
    out = model_cost(trainer.model, trainer.val_set, trainer.device)
    if result.history:
        out["peak_memory_mb"] = float(max(h["peak_memory_mb"] for h in result.history))
    if result.train_time_s > 0:
        t = trainer.config
        out["images_per_s"] = result.iterations * t.data.batch_size * trainer.world.size / result.train_time_s
    return out


def model_cost(model, val_set, device) -> dict[str, float]:
    """``params`` and ``gflops`` (one inference forward of the first validation image, ``engine.cost``)."""
    from rcnn_lab.engine.cost import inference_gflops
    from rcnn_lab.models.builder import count_parameters

    out = {"params": float(count_parameters(model))}
    if len(val_set):
        out["gflops"] = inference_gflops(model, val_set[0][0], device)
    return out


def log_evaluation(journal, evaluated, metrics: dict, per_class: dict, iteration: int, out: Path) -> None:
    """The final evaluation's files: ``eval/per_class.json``, ``eval/metrics.json`` and the saved detections
    (``engine.eval_file``: detections + GT, for error analysis without retraining). ``evaluated`` is the
    ``Trainer`` or ``engine.evaluator.Evaluator`` that ran it (its ``last_eval``, ``val_set`` and ``config``)."""
    from rcnn_lab.engine import eval_file

    journal.text(json.dumps(per_class, indent=2), "eval/per_class.json")
    journal.text(json.dumps(metrics, indent=2), "eval/metrics.json")
    final = evaluated.last_eval
    if final is not None and final.predictions is not None:
        pred = final.predictions
        data = eval_file.build(pred.results, pred.image_ids, evaluated.val_set.coco(), iteration,
                               evaluated.config.eval.iou_types)
        path = eval_file.write(Path(out) / eval_file.ARTIFACT, data)
        journal.artifact(path, str(Path(eval_file.ARTIFACT).parent))


def log_results(journal, trainer, result, out: Path, log_checkpoint: bool, title: str = "") -> None:
    """The run's result files, through its journal (stored in MLflow in order, or replayed later)."""
    import matplotlib.pyplot as plt

    log_evaluation(journal, trainer, result.metrics, result.per_class, result.iterations, out)
    fig = loss_curve(result.history, title or trainer.config.name)
    journal.figure(fig, "loss_curve.png")
    plt.close(fig)
    if log_checkpoint:
        final = ckpt.latest(ckpt.folder(out))
        if final is not None:
            journal.artifact(final, "checkpoint")


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


def extra_hooks(run, journal) -> list[Hook]:
    from rcnn_lab.runner.hooks import GalleryHook

    hooks: list[Hook] = []
    if run.config.train.grad_probe_every:
        hooks.append(GradNormHook(run.config.train.grad_probe_every))
    if run.config.eval.gallery:
        hooks.append(GalleryHook(journal, run.config.eval.gallery))
    return hooks
