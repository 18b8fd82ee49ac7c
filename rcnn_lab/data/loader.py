"""Batching: ``collate``, aspect-ratio grouping and deterministic, resumable batch streams.

Training (``build_loader(..., infinite=True)``) is an endless stream of batches fixed by ``seed``:

* Epoch ``e`` visits the dataset in the order of ``torch.randperm`` with a generator seeded from
  ``SeedSequence([seed, 0, e])`` (index order without ``shuffle``). Seeds go through SeedSequence
  rather than ``seed + e`` so that runs with neighbouring seeds do not share epoch orders.
* Without grouping, consecutive chunks of that order form batches; with ``group_aspect_ratio``,
  images are binned into landscape/square (w/h >= 1) and portrait (w/h < 1) and a batch is
  emitted when a bin holds ``batch_size`` images. An epoch's last incomplete batch (per bin) is
  completed with the first images of the same bin in that epoch's order, so every epoch has the
  same number of full batches: ``ceil(n / batch_size)``, or the sum over bins when grouped.
* ``aspect_ratio_group_factor = k`` groups as torchvision's detection references do
  (``create_aspect_ratio_groups`` and ``GroupedBatchSampler``): bins split at
  ``2 ** linspace(-1, 1, 2k + 1)``, ``n // batch_size`` batches per epoch, the leftovers of the
  fullest bins completed (by repeating that bin's images in epoch order) until the count is met.
* Because that count is fixed, iteration ``i`` is batch ``i % B`` of epoch ``i // B``: resuming at
  ``start_iter`` computes the position by index arithmetic and loads no skipped image.
* Distributed training (``rank``/``world_size``): ``batch_size`` is the *global* batch; rank ``r``
  of ``N`` takes images ``r, r+N, ...`` of every batch, so the N ranks together see exactly the
  images (and augmentations) a single process would, whatever N is.
* ``per_process`` (``data.sampler: per_process``): instead, each rank draws its own share as
  torchvision's reference ``train.py`` does under ``torchrun``: ``DistributedSampler`` (epoch ``e``
  permuted by ``torch.randperm`` with a generator seeded ``seed + e``, padded by repeating its
  start to a multiple of N, rank ``r`` taking positions ``r, r+N, ...``) and the rank's own
  grouping into batches of ``batch_size / N`` (``GroupedBatchSampler`` with
  ``aspect_ratio_group_factor``, else plain chunks). With seed 0 a rank draws exactly the
  reference's batches; the images a step sees then depend on N.
* Sample ``index`` of epoch ``e`` is transformed with a ``torch.Generator`` seeded from
  ``SeedSequence([seed, 1, e, index])``, so augmentation is identical with any ``num_workers``
  and after resuming.

Evaluation (``infinite=False, shuffle=False``, no transforms) is one ordered pass; the last
batch may be smaller. ``torch.utils.data.DataLoader`` does the loading (worker processes,
pinning) and receives its own seeded generator, so creating a stream never touches torch's
global RNG (which Mask R-CNN's samplers use).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rcnn_lab.data.transforms import Compose
from rcnn_lab.errors import ConfigError, Problem

_MASK64 = 2**64 - 1


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), ...]`` -> ``([images], [targets])`` (images keep their own sizes)."""
    return [item[0] for item in batch], [item[1] for item in batch]


def aspect_ratio_groups(aspect_ratios: Sequence[float], factor: int | None = None) -> list[int]:
    """Group id per image. ``factor`` None: 0 for landscape or square (width / height >= 1), 1 for
    portrait. ``factor`` k >= 0: torchvision's bins, ``bisect_right`` over ``2 ** linspace(-1, 1, 2k + 1)``
    (k = 0: the single edge 1.0)."""
    if factor is None:
        return [0 if ratio >= 1.0 else 1 for ratio in aspect_ratios]
    edges = sorted((2 ** np.linspace(-1, 1, 2 * factor + 1)).tolist() if factor > 0 else [1.0])
    return [bisect.bisect_right(edges, ratio) for ratio in aspect_ratios]


def _seed_sequence(*words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([w & _MASK64 for w in words])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed (63 bits) of the transform generator for sample ``index`` in ``epoch``."""
    lo, hi = _seed_sequence(seed, 1, epoch, index).generate_state(2, np.uint32)
    return (int(hi) << 32 | int(lo)) & (2**63 - 1)


class BatchSchedule:
    """Which dataset indices form each batch of each epoch: pure index arithmetic, no data access.

    Args:
        num_samples: dataset size.
        batch_size: images per batch.
        shuffle: permute each epoch (else index order).
        seed: seed of the epoch permutations.
        group_ids: group per image (batches never mix groups); None: one group.
        complete: fill each epoch's last batch (per group) to ``batch_size`` (training) or leave
            it short (evaluation).
        torchvision: batch groups as torchvision's ``GroupedBatchSampler`` (``n // batch_size``
            batches per epoch; see the module docstring). Needs ``group_ids`` and ``complete``.
        rank, world_size: with ``per_process``, the schedule of rank ``rank`` of ``world_size``
            (``DistributedSampler``'s share; batches of ``batch_size / world_size``).
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 group_ids: Sequence[int] | None = None, complete: bool = True, torchvision: bool = False,
                 per_process: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.per_process, self.rank, self.world_size, self.total = per_process, rank, world_size, num_samples
        if per_process:
            if batch_size % world_size:
                raise ValueError(f"batch_size {batch_size} is not a multiple of world_size {world_size}")
            if group_ids is not None and not torchvision:
                raise ValueError("per_process batches group only as torchvision does (aspect_ratio_group_factor)")
            batch_size, num_samples = batch_size // world_size, math.ceil(num_samples / world_size)
        if group_ids is not None and len(group_ids) != self.total:
            raise ValueError(f"{len(group_ids)} group ids for {self.total} samples")
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.complete, self.torchvision = complete, torchvision
        if torchvision and (self.group_ids is None or not complete):
            raise ValueError("torchvision grouping needs group_ids and complete=True")
        sizes = [num_samples] if self.group_ids is None else [self.group_ids.count(g) for g in sorted(set(self.group_ids))]
        self.batches_per_epoch = num_samples // batch_size if torchvision else sum(math.ceil(n / batch_size) for n in sizes)

    def order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch ``epoch`` visits them (this rank's share with ``per_process``)."""
        if self.per_process:
            return self._distributed_order(epoch)
        if not self.shuffle:
            return list(range(self.num_samples))
        state = _seed_sequence(self.seed, 0, epoch).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed((int(state[1]) << 32 | int(state[0])) & (2**63 - 1))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def _distributed_order(self, epoch: int) -> list[int]:
        """``DistributedSampler(num_replicas=world_size, rank=rank, shuffle, seed).set_epoch(epoch)``'s indices."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            indices = torch.randperm(self.total, generator=generator).tolist()
        else:
            indices = list(range(self.total))
        total = self.num_samples * self.world_size
        indices += (indices * math.ceil((total - len(indices)) / max(len(indices), 1)))[:total - len(indices)]
        return indices[self.rank:total:self.world_size]

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of epoch ``epoch``, in order."""
        order = self.order(epoch)
        if self.torchvision:
            return self._torchvision_epoch(order)
        groups = [0] * self.total if self.group_ids is None else self.group_ids
        batches: list[list[int]] = []
        pending: dict[int, list[int]] = {}
        for index in order:
            bucket = pending.setdefault(groups[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                pending[groups[index]] = []
        for group in sorted(pending):
            bucket = pending[group]
            if not bucket:
                continue
            if self.complete:
                members = [i for i in order if groups[i] == group]
                bucket = bucket + list(itertools.islice(itertools.cycle(members), self.batch_size - len(bucket)))
            batches.append(bucket)
        return batches


    def _torchvision_epoch(self, order: list[int]) -> list[list[int]]:
        """``GroupedBatchSampler.__iter__`` of torchvision's detection references, as a list."""
        pending: dict[int, list[int]] = {}
        seen: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for index in order:
            group = self.group_ids[index]
            pending.setdefault(group, []).append(index)
            seen.setdefault(group, []).append(index)
            if len(pending[group]) == self.batch_size:
                batches.append(pending.pop(group))
                pending[group] = []  # the reference's defaultdict re-creates the bin at once, last in order
        # the fullest leftovers first (a stable sort: ties keep the bins' order in the dict)
        for group, bucket in sorted(pending.items(), key=lambda item: len(item[1]), reverse=True):
            if len(batches) == self.batches_per_epoch:
                break
            missing = self.batch_size - len(bucket)
            batches.append(bucket + list(itertools.islice(itertools.cycle(seen[group]), missing)))
        return batches


class StreamSampler(Sampler):
    """Batch sampler over a ``BatchSchedule`` yielding lists of ``(epoch, index)`` keys.

    Infinite: from global batch ``start_iter`` on, epoch after epoch. Finite: the rest of epoch 0
    after ``start_iter`` batches. With ``world_size > 1`` each batch is this ``rank``'s share
    (``batch[rank::world_size]``; empty shares of a short final batch are skipped).
    """

    def __init__(self, schedule: BatchSchedule, infinite: bool, start_iter: int = 0, rank: int = 0, world_size: int = 1):
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.schedule, self.infinite, self.start_iter = schedule, infinite, start_iter
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = self.schedule.batches_per_epoch
        if per_epoch == 0:
            return
        if self.infinite:
            epoch, offset = divmod(self.start_iter, per_epoch)
        elif self.start_iter >= per_epoch:
            return
        else:
            epoch, offset = 0, self.start_iter
        while True:
            for batch in self.schedule.epoch(epoch)[offset:]:
                if self.world_size > 1 and not self.schedule.per_process:  # per_process: the schedule is this rank's
                    batch = batch[self.rank::self.world_size]
                    if not batch:
                        continue
                yield [(epoch, index) for index in batch]
            if not self.infinite:
                return
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite batch stream has no length; see batches_per_epoch")
        if self.world_size > 1 and not self.schedule.per_process:
            return sum(len(b) > self.rank for b in self.schedule.epoch(0)[self.start_iter:])
        return max(0, self.schedule.batches_per_epoch - self.start_iter)


class TransformedSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)`` keys, transformed with a per-sample seeded generator."""

    def __init__(self, dataset: Dataset, transforms: Compose, seed: int):
        self.dataset, self.transforms, self.seed = dataset, transforms, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        epoch, index = key
        image, target = self.dataset[index]
        if len(self.transforms):
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            image, target = self.transforms(image, target, generator=generator)
        return image, target


class BatchStream:
    """Iterable of ``(images, targets)`` batches (see the module docstring); ``len`` when finite."""

    def __init__(self, samples: TransformedSamples, sampler: StreamSampler, num_workers: int, pin_memory: bool, seed: int):
        self.samples, self.sampler = samples, sampler
        self.loader = DataLoader(
            samples, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed & (2**63 - 1)),
            persistent_workers=num_workers > 0 and not sampler.infinite,
        )

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.schedule.batches_per_epoch

    @property
    def infinite(self) -> bool:
        return self.sampler.infinite

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.sampler)


def batch_schedule(dataset: Dataset, batch_size: int, shuffle: bool = False, group_aspect_ratio: bool = False,
                   aspect_ratio_group_factor: int | None = None, seed: int = 0, infinite: bool = False,
                   per_process: bool = False, rank: int = 0, world_size: int = 1) -> BatchSchedule:
    """The :class:`BatchSchedule` :func:`build_loader` streams (its ``batches_per_epoch`` sizes an epoch).
    ``per_process``: rank ``rank``'s own schedule (the module docstring); else the global one."""
    group_ids = None
    if group_aspect_ratio:
        ratios = getattr(dataset, "aspect_ratios", None)
        if ratios is None:
            raise ConfigError([Problem("data.group_aspect_ratio", f"{type(dataset).__name__} has no aspect_ratios(); "
                                       "set group_aspect_ratio: false")])
        group_ids = aspect_ratio_groups(ratios(), aspect_ratio_group_factor)
    per_process = per_process and infinite
    return BatchSchedule(len(dataset), batch_size, shuffle=shuffle, seed=seed, group_ids=group_ids, complete=infinite,
                         torchvision=group_aspect_ratio and infinite and aspect_ratio_group_factor is not None,
                         per_process=per_process, rank=rank if per_process else 0, world_size=world_size if per_process else 1)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    transforms: Sequence[Callable] | Compose | None = None,
    group_aspect_ratio: bool = False,
    aspect_ratio_group_factor: int | None = None,
    seed: int = 0,
    infinite: bool = False,
    start_iter: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    per_process: bool = False,
) -> BatchStream:
    """Batches of ``(list of images, list of targets)`` from ``dataset``.

    Args:
        dataset: a contract dataset (``aspect_ratios()`` needed when grouping).
        batch_size: images per batch.
        shuffle: a new permutation each epoch (training); else index order.
        num_workers: loader worker processes (0: load in this process). Results do not depend on it.
        transforms: callables ``(image, target, generator=None)`` applied in order (training only).
        group_aspect_ratio: never mix landscape/square and portrait images in a batch.
        aspect_ratio_group_factor: with ``group_aspect_ratio``, torchvision's finer bins and
            batching instead (training streams; see the module docstring).
        seed: the stream's seed (epoch orders and per-sample transform seeds).
        infinite: endless training stream with full batches; else one pass, last batch possibly short.
        start_iter: skip this many batches (resume): the stream continues exactly where an
            uninterrupted one would be.
        pin_memory: pin batch tensors (for asynchronous copies to a GPU).
        rank, world_size: distributed training: ``batch_size`` is global and must be divisible by
            ``world_size``; this stream yields rank ``rank``'s ``batch_size / world_size`` images.
        per_process: (training) each rank samples and groups its own share, as torchvision's
            reference does under ``torchrun`` (the module docstring); else each global batch is split.
    """
    n = len(dataset)
    if infinite and n == 0:
        raise ConfigError([Problem("data.train", "the training dataset has no images; check its spec (paths, filters)")])
    if infinite and batch_size % world_size:
        raise ConfigError([Problem("data.batch_size", f"{batch_size} images per (global) batch cannot be split evenly "
                                   f"over {world_size} processes; use a multiple of {world_size}")])
    compose = transforms if isinstance(transforms, Compose) else Compose(list(transforms or ()))
    schedule = batch_schedule(dataset, batch_size, shuffle, group_aspect_ratio, aspect_ratio_group_factor, seed, infinite,
                              per_process, rank, world_size)
    sampler = StreamSampler(schedule, infinite=infinite, start_iter=start_iter, rank=rank, world_size=world_size)
    return BatchStream(TransformedSamples(dataset, compose, seed), sampler, num_workers, pin_memory, seed)


def take(stream: Any, count: int) -> list[tuple[list[torch.Tensor], list[dict]]]:
    """The first ``count`` batches of ``stream`` (convenience for tests and probes)."""
    return list(itertools.islice(iter(stream), count))
