"""Data-parallel training across processes (``torchrun``): process group, DDP, sharded evaluation.

A process started by ``torchrun`` (or ``rcnn-lab run --nproc N``) finds ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in its environment; :func:`setup` joins the process
group (NCCL for CUDA, gloo for CPU) and returns this rank's device (``cuda:LOCAL_RANK``). Without
those variables everything here is a no-op: a single process is rank 0 of a world of size 1.

Conventions of a distributed run:

* ``data.batch_size`` is the *global* batch (as detectron2's ``IMS_PER_BATCH``): each of the N
  ranks takes a disjoint ``batch_size / N`` images of every global batch, so the images and
  augmentations seen per iteration do not depend on N (see ``rcnn_lab.data.loader``).
* Gradients are averaged across ranks by ``DistributedDataParallel``; the logged losses are the
  average of the ranks' losses (so every rank sees the same values, and a non-finite loss stops
  every rank at once).
* Rank 0 alone reads and writes checkpoints (the state it reads is broadcast to the others, so
  nodes need no shared file system) and rank 0 alone talks to MLflow.
* Evaluation shards the validation images across ranks; rank 0 gathers every rank's COCO
  detections and computes the metrics, which it broadcasts.
* The RoI/anchor samplers draw from torch's global RNG: each rank reseeds it from
  ``(train.seed, rank, start iteration)`` after the model is built (the model itself is
  identical on every rank; DDP broadcasts rank 0's parameters anyway).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

FIND_UNUSED_ENV = "RCNN_LAB_DDP_FIND_UNUSED"
TIMEOUT_ENV = "RCNN_LAB_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and decides."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def env_world() -> World:
    """The world ``torchrun`` (or ``--nproc``'s launcher) describes in the environment (single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    rank = int(os.environ.get("RANK", "0"))
    return World(rank, size, int(os.environ.get("LOCAL_RANK", str(rank))))


def world() -> World:
    """The current world: the initialised process group, else the environment."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), env_world().local_rank)
    return env_world()


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group described by the environment (once); returns (world, this rank's device).

    CUDA: device ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) and the NCCL backend; CPU: gloo.
    A single process gets ``(World(), device)`` unchanged.
    """
    w = env_world()
    if not w.active:
        return w, device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return world(), device


def broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and return its result on every rank; an exception is raised on every rank."""
    w = world()
    if not w.active:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if w.main:
        try:
            outcome = (True, fn())
        except Exception as exc:  # raised on every rank below, so no rank waits forever
            outcome = (False, exc)
    ok, value = broadcast(outcome)
    if not ok:
        raise value
    return value


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    w = world()
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average of ``tensor`` over ranks (itself for a single process)."""
    if not world().active:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / world().size


def rank_seed(seed: int, rank: int, iteration: int = 0) -> int:
    """Seed of ``rank``'s global RNG from the run seed and the iteration it starts at."""
    lo, hi = np.random.SeedSequence([seed & (2**64 - 1), 2, rank, iteration]).generate_state(2, np.uint32)
    return (int(hi) << 32 | int(lo)) & (2**63 - 1)


def reseed(seed: int, start_iteration: int) -> None:
    """Give each rank its own sampler RNG stream (no-op for a single process)."""
    w = world()
    if w.active:
        import random

        s = rank_seed(seed, w.rank, start_iteration)
        random.seed(s)
        torch.manual_seed(s)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` in a distributed run, else ``model`` itself.

    ``find_unused_parameters`` is on by default: a component whose parameters get no gradient in
    some iteration (a plugin branch, a head without samples) would otherwise stop DDP with
    "Expected to have finished reduction". Set ``RCNN_LAB_DDP_FIND_UNUSED=0`` to save the extra
    graph traversal when every trainable parameter always gets a gradient (true for the built-in
    Mask R-CNN components, in both ``proposal_gradient`` modes); PyTorch prints a warning per rank
    saying so when it is on.
    """
    if not world().active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    find_unused = os.environ.get(FIND_UNUSED_ENV, "1") != "0"
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def load_latest(folder: Path) -> dict | None:
    """The newest checkpoint in ``folder`` read by rank 0 and broadcast (None without one)."""
    from rcnn_lab.engine import checkpoint as ckpt

    def read() -> dict | None:
        latest = ckpt.latest(folder)
        return ckpt.load(latest) if latest is not None else None

    return on_main(read)


def eval_shard(dataset, max_images: int | None):
    """This rank's share of the first ``max_images`` validation images (images r, r+N, ...)."""
    w = world()
    if not w.active:
        return dataset
    from torch.utils.data import Subset

    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    return Subset(dataset, range(w.rank, n, w.size))


def evaluate(model: nn.Module, loader, dataset, device: torch.device, iou_types: Sequence[str] = ("bbox", "segm"),
             max_images: int | None = None, amp_dtype: torch.dtype | None = None, per_class: bool = True,
             class_agnostic: bool = False, progress: bool = False):
    """``engine.evaluate.evaluate`` over every rank's shard (loader over :func:`eval_shard`); ``progress``: a progress bar (one process).

    Each rank predicts its images; rank 0 gathers the COCO detections, scores them and broadcasts
    the result. ``eval_images_per_s`` is images / the slowest rank's forward time (the job's
    throughput). A single process calls ``evaluate`` unchanged.
    """
    from rcnn_lab.engine.evaluate import EvalResult, Predictions, coco_metrics, predict
    from rcnn_lab.engine.evaluate import evaluate as evaluate_one

    w = world()
    if not w.active:
        return evaluate_one(model, loader, dataset, device, iou_types=tuple(iou_types), max_images=max_images,
                            amp_dtype=amp_dtype, per_class=per_class, class_agnostic=class_agnostic, progress=progress)
    started = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            pred = predict(model, loader, dataset.categories, device, amp_dtype=amp_dtype)
    finally:
        for m, training in modes:
            m.training = training
    parts = all_gather(pred)

    def score() -> EvalResult:
        results = [r for p in parts for r in p.results]
        ids = [i for p in parts for i in p.image_ids]
        metrics, classes = coco_metrics(dataset.coco(), results, tuple(iou_types), per_class=per_class, image_ids=ids,
                                        class_agnostic=class_agnostic)
        slowest = max(p.inference_time_s for p in parts)
        metrics["eval_images_per_s"] = len(ids) / slowest if slowest > 0 else 0.0
        metrics["eval_time_s"] = time.perf_counter() - started
        return EvalResult(metrics, classes)

    result = on_main(score)
    if w.main:  # the detections stay on rank 0 (gallery, saved eval file); other ranks get the metrics only
        result.predictions = Predictions([r for p in parts for r in p.results], [i for p in parts for i in p.image_ids])
    return result
