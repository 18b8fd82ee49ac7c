"""Loader: deterministic infinite streams, exact resume, aspect-ratio grouping, evaluation order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from rcnn_lab.data.loader import BatchSchedule, aspect_ratio_groups, build_loader, collate, take
from rcnn_lab.errors import ConfigError

RATIOS = [1.0, 0.5, 2.0, 0.75, 1.5, 1.0, 0.5, 1.33, 0.8, 1.0]  # 6 landscape/square, 4 portrait


class Toy(Dataset):
    """Tiny images whose pixels hold their index; records which indices were loaded."""

    def __init__(self, ratios=RATIOS):
        self.ratios, self.loaded = list(ratios), []

    def __len__(self) -> int:
        return len(self.ratios)

    def __getitem__(self, index: int):
        self.loaded.append(index)
        h, w = (4, 8) if self.ratios[index] >= 1 else (8, 4)
        target = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([1]),
                  "masks": torch.zeros((1, h, w), dtype=torch.uint8), "image_id": index,
                  "area": torch.tensor([4.0]), "iscrowd": torch.tensor([0])}
        return torch.full((3, h, w), float(index)), target

    def aspect_ratios(self) -> list[float]:
        return self.ratios


def jitter(image, target, generator=None):
    return image + torch.rand((), generator=generator), target


def ids(batches) -> list[list[int]]:
    return [[t["image_id"] for t in targets] for _, targets in batches]


def same_batches(a, b) -> bool:
    return ids(a) == ids(b) and all(torch.equal(x, y) for (ia, _), (ib, _) in zip(a, b) for x, y in zip(ia, ib))


def train_stream(ds, **kw):
    args = dict(batch_size=3, shuffle=True, transforms=[jitter], group_aspect_ratio=True, seed=5, infinite=True)
    return build_loader(ds, **{**args, **kw})


def test_resume_yields_exactly_the_uninterrupted_batches():
    full = take(train_stream(Toy()), 14)
    for start in (1, 4, 9):  # inside the first epoch, at an epoch boundary, in a later epoch
        ds = Toy()
        resumed = take(train_stream(ds, start_iter=start), 14 - start)
        assert same_batches(resumed, full[start:])
        assert len(ds.loaded) == 3 * (14 - start)  # skipped batches were never loaded


def test_stream_is_deterministic_and_seed_dependent():
    assert same_batches(take(train_stream(Toy()), 8), take(train_stream(Toy()), 8))
    assert not same_batches(take(train_stream(Toy()), 8), take(train_stream(Toy(), seed=6), 8))


def test_workers_do_not_change_the_stream():
    assert same_batches(take(train_stream(Toy(), num_workers=2), 6), take(train_stream(Toy()), 6))


def test_every_epoch_covers_the_dataset_with_full_batches():
    schedule = BatchSchedule(10, 4, shuffle=True, seed=0)
    assert schedule.batches_per_epoch == 3
    epochs = [schedule.epoch(e) for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 4]
        assert set(sum(batches, [])) == set(range(10))
    assert epochs[0] != epochs[1]
    stream = build_loader(Toy(), 4, shuffle=True, infinite=True, seed=0)
    assert ids(take(stream, 6)) == sum(epochs[:2], [])


def test_grouping_puts_same_orientation_images_together():
    stream = train_stream(Toy(), batch_size=4, transforms=[])
    assert stream.batches_per_epoch == 2 + 1  # ceil(6 / 4) landscape + ceil(4 / 4) portrait
    batches = ids(take(stream, 9))
    for batch in batches:
        assert len(batch) == 4 and len({RATIOS[i] >= 1 for i in batch}) == 1
    assert set(sum(batches[:3], [])) == set(range(10))
    mixed = ids(take(train_stream(Toy(), batch_size=4, transforms=[], group_aspect_ratio=False), 9))
    assert any(len({RATIOS[i] >= 1 for i in batch}) == 2 for batch in mixed)


def test_evaluation_loader_is_finite_ordered_and_untransformed():
    ds = Toy()
    loader = build_loader(ds, 4, shuffle=False, transforms=[], infinite=False)
    assert len(loader) == 3
    batches = list(loader)
    assert ids(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(torch.equal(img, ds[i][0]) for (images, _), b in zip(batches, ids(batches)) for img, i in zip(images, b))
    assert ids(list(loader)) == ids(batches)  # iterable more than once


def test_creating_and_reading_a_stream_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    take(train_stream(Toy()), 4)
    assert torch.equal(torch.get_rng_state(), state)


def test_collate_and_empty_training_set():
    images, targets = collate([Toy()[0], Toy()[1]])
    assert [i.shape for i in images] == [(3, 4, 8), (3, 8, 4)] and [t["image_id"] for t in targets] == [0, 1]
    with pytest.raises(ConfigError, match="no images"):
        build_loader(Toy([]), 2, infinite=True)


def test_torchvision_grouping_equals_the_references_grouped_batch_sampler():
    from tests.engine.test_torchvision_recipe import GroupedBatchSampler, Permutation, create_aspect_ratio_groups

    ratios = np.random.default_rng(0).uniform(0.4, 2.5, 37).tolist()
    groups = create_aspect_ratio_groups(ratios, k=3)
    assert aspect_ratio_groups(ratios, 3) == groups and aspect_ratio_groups(ratios, 0) == create_aspect_ratio_groups(ratios, 0)
    for batch_size in (2, 4, 5):
        schedule = BatchSchedule(37, batch_size, seed=3, group_ids=groups, torchvision=True)
        assert schedule.batches_per_epoch == 37 // batch_size
        for epoch in range(3):
            reference = list(GroupedBatchSampler(Permutation(schedule.order(epoch)), groups, batch_size))
            assert schedule.epoch(epoch) == reference


def test_group_factor_streams_resume_exactly():
    ds = Toy([1.0, 0.5, 2.0, 0.75, 1.5, 1.0, 0.5, 1.33, 0.8, 1.0, 0.6])
    full = take(train_stream(ds, aspect_ratio_group_factor=3), 9)
    assert ids(take(train_stream(Toy(ds.ratios), aspect_ratio_group_factor=3, start_iter=4), 5)) == ids(full[4:])
    assert len(full[0][0]) == 3 and train_stream(ds, aspect_ratio_group_factor=3).batches_per_epoch == 11 // 3


@pytest.mark.parametrize("world,n,batch", [(1, 13, 2), (2, 13, 4), (3, 20, 6), (4, 7, 4)])
def test_per_process_batches_are_the_references_distributed_sampler_and_grouping(world, n, batch):
    """Each rank draws what torchvision's train.py draws under torchrun: DistributedSampler + GroupedBatchSampler."""
    from torch.utils.data.distributed import DistributedSampler

    from rcnn_lab.data.loader import BatchSchedule, StreamSampler
    from tests.engine.test_torchvision_recipe import GroupedBatchSampler, create_aspect_ratio_groups

    ratios = ([0.5, 0.75, 1.0, 1.33, 2.0, 0.6, 1.5] * 3)[:n]
    group_ids = create_aspect_ratio_groups(ratios, k=3)
    seed = 0
    for rank in range(world):
        schedule = BatchSchedule(n, batch, seed=seed, group_ids=group_ids, torchvision=True, per_process=True,
                                 rank=rank, world_size=world)
        sampler = DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        reference = GroupedBatchSampler(sampler, group_ids, batch // world)
        assert schedule.batches_per_epoch == len(reference)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            assert schedule.epoch(epoch) == list(reference), (rank, epoch)
        stream = StreamSampler(schedule, infinite=True, start_iter=0, rank=rank, world_size=world)
        first = [b for _, b in zip(range(2 * schedule.batches_per_epoch), stream)]
        assert [[i for _, i in b] for b in first] == schedule.epoch(0) + schedule.epoch(1)  # not sliced again


def test_per_process_without_grouping_chunks_the_ranks_share():
    from torch.utils.data.distributed import DistributedSampler

    from rcnn_lab.data.loader import BatchSchedule

    schedule = BatchSchedule(11, 4, seed=5, per_process=True, rank=1, world_size=2)
    sampler = DistributedSampler(list(range(11)), num_replicas=2, rank=1, seed=5)
    sampler.set_epoch(2)
    share = list(sampler)
    assert schedule.order(2) == share and schedule.batches_per_epoch == 3
    assert schedule.epoch(2) == [share[0:2], share[2:4], share[4:6]]
    with pytest.raises(ValueError, match="group only as torchvision does"):
        BatchSchedule(11, 4, group_ids=[0] * 11, per_process=True, world_size=2)
