"""Evaluation of a run's config, in one place: the loader over ``data.val`` and the COCO scoring call.

The trainer evaluates during and after training with :func:`eval_loader` and :func:`score`;
:class:`Evaluator` runs the same two on a model whose weights come from elsewhere (``rcnn-lab
eval``: a checkpoint, a file, torchvision's weights), so an evaluation of a finished run's last
checkpoint gives the numbers that run logged as its final evaluation. An ``Evaluator`` carries what
evaluation hooks read from a trainer (``config``, ``val_set``, ``last_eval``, ``total_iterations``,
``device``), so ``runner.hooks.GalleryHook`` draws its panels unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rcnn_lab.config.schema import RunConfig
from rcnn_lab.engine.hooks import Hook, Hooks


def eval_loader(config: RunConfig, val_set, device: torch.device):
    """This rank's share of the first ``eval.max_images`` validation images, in order, without transforms."""
    from rcnn_lab.data.loader import build_loader
    from rcnn_lab.engine import distributed

    images = distributed.eval_shard(val_set, config.eval.max_images)  # all of them for one process
    return build_loader(images, config.eval.batch_size, shuffle=False, num_workers=config.data.num_workers,
                        transforms=[], group_aspect_ratio=False, seed=config.train.seed, infinite=False,
                        pin_memory=device.type == "cuda")  # page-locked batches: asynchronous copies to the GPU


def score(model: nn.Module, loader, val_set, config: RunConfig, device: torch.device, amp_dtype: torch.dtype | None,
          progress: bool = False):
    """COCO-evaluate ``model`` over ``loader`` with the run's ``eval:`` settings (sharded over ranks under torchrun;
    ``progress``: a progress bar over the batches of a single process)."""
    from rcnn_lab.engine.distributed import evaluate

    e = config.eval
    return evaluate(model, loader, val_set, device, iou_types=tuple(e.iou_types), max_images=e.max_images,
                    amp_dtype=amp_dtype, per_class=e.per_class, class_agnostic=e.class_agnostic, progress=progress)


def place(model: nn.Module, config: RunConfig, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in the run's memory format (``train.channels_last``: oneDNN's / tensor cores' layout)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


class Evaluator:
    """Evaluate ``model`` (weights already loaded) on ``val_set`` the way the trainer does.

    ``iteration`` is the step the weights stand for (a checkpoint's iteration, 0 for outside
    weights): the evaluation is reported at that step, and hooks see it as the run's last.
    ``amp_dtype``: the trainer's autocast dtype for ``train.amp`` on ``device`` (``trainer.resolve_amp``).
    """

    def __init__(self, config: RunConfig, model: nn.Module, device: torch.device, val_set, iteration: int,
                 amp_dtype: torch.dtype | None, hooks: Sequence[Hook] = (), progress: bool = False):
        self.config, self.device, self.val_set = config, device, val_set
        self.model = place(model, config, device)
        self.total_iterations = iteration
        self.amp_dtype, self.progress = amp_dtype, progress
        self.hooks = Hooks(list(hooks))
        self.val_loader = eval_loader(config, val_set, device)
        self.last_eval = None  # the EvalResult, detections included (the gallery hook and the saved eval file read it)

    def evaluate(self):
        result = score(self.model, self.val_loader, self.val_set, self.config, self.device, self.amp_dtype, self.progress)
        self.last_eval = result
        self.hooks.after_eval(self, self.total_iterations, result.metrics, result.per_class)
        return result
