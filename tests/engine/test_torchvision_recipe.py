"""experiments/coco_r50_fpn_torchvision.yaml trains step by step as torchvision's reference loop does.

What was compared, and against what: torchvision's ``references/detection`` files as stored at
these pytorch/vision commits were read line by line and the parts used below transcribed (the
files themselves are not vendored):

* ``group_by_aspect_ratio.py`` @ d2aeec2a39981969440d24550feb86c75d894f82: ``_quantize``,
  ``create_aspect_ratio_groups(dataset, k)`` (``bisect_right`` over ``2 ** linspace(-1, 1, 2k + 1)``;
  for a COCO dataset the ratio comes from the JSON's width and height) and ``GroupedBatchSampler``
  (a bin's buffer is yielded when it holds ``batch_size`` images; at the end the fullest leftover
  buffers are completed with their bin's images repeated in order, ``_repeat_to_at_least``, until
  ``len(sampler) // batch_size`` batches were yielded): copied below verbatim in substance.
* ``train.py`` @ 3ceb056d4c4a2d79ccdc65cbd2342b0e89a7ae47: ``DistributedSampler(dataset)`` under
  torchrun (``RandomSampler`` without it) + ``GroupedBatchSampler`` (``--aspect-ratio-group-factor 3``),
  ``set_epoch(epoch)`` before each epoch, parameters ``[p for p in model.parameters() if
  p.requires_grad]`` in one group, ``SGD(lr=0.02, momentum=0.9, weight_decay=1e-4)``,
  ``MultiStepLR(milestones=[16, 22], gamma=0.1)`` stepped once after each epoch. The recipe uses
  ``data.sampler: per_process``, so the transcription draws with torch's own
  ``DistributedSampler(num_replicas=1, rank=0, seed=0)``, as ``torchrun --nproc_per_node=1`` would.
* ``engine.py`` @ 738bb42169380ef4d56afdf0bb5eb3e83b66815e: ``train_one_epoch`` with a warm-up in
  epoch 0 only over ``min(1000, len(data_loader) - 1)`` iterations from factor 1/1000
  (``utils.warmup_lr_scheduler`` there; later versions use ``LinearLR(start_factor=1/1000, total_iters=...)``,
  the same factors, which the transcription uses), and per batch ``loss_dict = model(images,
  targets)``, ``losses = sum(...)``, ``zero_grad``, ``backward``, ``step``, then the warm-up's ``step()``.
* ``transforms.py`` @ 3749cad2d6a3d3ee976c15d48e30afe987642cb6 (the v1 reference transforms, with
  ``ToDtype``, which arrived with torchvision 0.16): ``RandomHorizontalFlip(0.5)``: ``if torch.rand(1) <
  p``: flip the image, ``boxes[:, [0, 2]] = width - boxes[:, [2, 0]]``, ``masks.flip(-1)``. The
  image reaches the model as ``PILToTensor`` + ``ToDtype(torch.float, scale=True)`` (uint8 / 255), which
  is what the project's reader gives for 8-bit files; the v2 pipeline (``--use-v2``, 0.16+) is not compared.
* ``coco_utils.py`` @ aaca9bdc237e2d4dd3d919e9ef3151a1133c6d40: ``ConvertCocoPolysToMask`` (crowd
  regions dropped, boxes clipped to the image, boxes with no width or height dropped) and
  ``_coco_remove_images_without_annotations`` (the recipe's ``filter_rule: torchvision``; checked in
  tests/data/test_coco.py).
* The model: ``maskrcnn_resnet50_fpn(weights_backbone=IMAGENET1K_V1)``: a ResNet-50 with
  ``FrozenBatchNorm2d``, ``_resnet_fpn_extractor(backbone, 3)``, ``MaskRCNN`` (torchvision as installed).

Randomness: the epoch permutation is the reference's own (torch's ``DistributedSampler``, seeded
0 + epoch, as the recipe's ``sampler: per_process`` draws it). The flips are the one draw not taken
as the reference takes it: the reference draws them from torch's global RNG (per DataLoader worker),
this project from a generator seeded per sample (so its DataLoader draws no worker base seed from
the global RNG either); the transcription flips with the sample's generator and gives its
DataLoader a private generator, and everything else is its own; the global RNG, which the RPN's and
RoI heads' samplers draw from, starts in the same state.
Decoding the COCO files is not part of the comparison either: both read items of the same
``CocoDataset`` (export-shapes writes compressed RLE, which the reference's loader cannot read).

Scale for a CPU: R50 at <= 96 px on 7 exported shape images padded to 7 aspect ratios, 2 images
per step, milestones at epochs 1 and 2 so that 4 steps cover the warm-up (min(1000, 3 - 1) = 2
steps), the end of epoch 0 (a leftover batch completed by repeating its bin's images), the epoch
boundary (epoch 1's permutation) and the first lr drop (step 4), whose update shows in the final
weights, compared bit for bit. The ImageNet weights are a stand-in file (no
download here; BatchNorm statistics of normal inputs, residual branches starting at zero so the
recipe's lr does not diverge on random heads): the same file for both sides.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
from collections import defaultdict
from itertools import chain, repeat

import numpy as np
import pytest
import torch
import torchvision
from pycocotools import mask as mask_utils
from torch.utils.data import BatchSampler, DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn_lab.data.coco import decode_segmentation, read_rgb
from rcnn_lab.data.export import export_shapes, write_png
from rcnn_lab.data.loader import sample_seed
from rcnn_lab.engine.hooks import Hook
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.engine.trainer import Trainer
from tests.conftest import EXPERIMENTS

RECIPE = EXPERIMENTS / "coco_r50_fpn_torchvision.yaml"
SHAPE = 48  # the exported square images, then padded to SIZES (every size at scale 1 under MIN_SIZE / MAX_SIZE)
SIZES = [(48, 48), (48, 80), (80, 48), (48, 64), (48, 96), (64, 48), (48, 56)]  # (height, width): 7 aspect ratios
STEPS, BATCH, SEED, MIN_SIZE, MAX_SIZE = 4, 2, 0, 48, 96
LR = 0.02  # the recipe's (its optimizer is not overridden here)


# --- the reference, transcribed ----------------------------------------------------------------

def _quantize(x, bins):
    bins = copy.deepcopy(bins)
    bins = sorted(bins)
    return list(map(lambda y: bisect.bisect_right(bins, y), x))


def create_aspect_ratio_groups(aspect_ratios, k=0):
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return _quantize(aspect_ratios, bins)


def _repeat_to_at_least(iterable, n):
    repeat_times = math.ceil(n / len(iterable))
    repeated = chain.from_iterable(repeat(iterable, repeat_times))
    return list(repeated)


class GroupedBatchSampler(BatchSampler):
    def __init__(self, sampler, group_ids, batch_size):
        self.sampler = sampler
        self.group_ids = group_ids
        self.batch_size = batch_size

    def __iter__(self):
        buffer_per_group = defaultdict(list)
        samples_per_group = defaultdict(list)
        num_batches = 0
        for idx in self.sampler:
            group_id = self.group_ids[idx]
            buffer_per_group[group_id].append(idx)
            samples_per_group[group_id].append(idx)
            if len(buffer_per_group[group_id]) == self.batch_size:
                yield buffer_per_group[group_id]
                num_batches += 1
                del buffer_per_group[group_id]
            assert len(buffer_per_group[group_id]) < self.batch_size
        expected_num_batches = len(self)
        num_remaining = expected_num_batches - num_batches
        if num_remaining > 0:
            for group_id, _ in sorted(buffer_per_group.items(), key=lambda x: len(x[1]), reverse=True):
                remaining = self.batch_size - len(buffer_per_group[group_id])
                samples_from_group_id = _repeat_to_at_least(samples_per_group[group_id], remaining)
                buffer_per_group[group_id].extend(samples_from_group_id[:remaining])
                assert len(buffer_per_group[group_id]) == self.batch_size
                yield buffer_per_group[group_id]
                num_remaining -= 1
                if num_remaining == 0:
                    break
        assert num_remaining == 0

    def __len__(self):
        return len(self.sampler) // self.batch_size


class Permutation(Sampler):
    """A fixed order as a sampler (tests/data/test_loader.py feeds the transcribed GroupedBatchSampler with it)."""

    def __init__(self, order):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


class FlippedItems(torch.utils.data.Dataset):
    """The dataset with the reference's RandomHorizontalFlip(0.5) (its draw from the sample's seed)."""

    def __init__(self, dataset, epoch):
        self.dataset, self.epoch = dataset, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        image, target = self.dataset[idx]
        target = dict(target)
        if torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(SEED, self.epoch, idx))) < 0.5:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
            target["boxes"] = boxes
            target["masks"] = target["masks"].flip(-1)
        return image, target


def collate_fn(batch):
    return tuple(zip(*batch))


def train_one_epoch(model, optimizer, data_loader, epoch, records, stop):
    model.train()
    lr_scheduler = None
    if epoch == 0:
        warmup_factor = 1.0 / 1000
        warmup_iters = min(1000, len(data_loader) - 1)
        lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_factor, total_iters=warmup_iters)
    for images, targets in data_loader:
        loss_dict = model(list(images), list(targets))
        losses = sum(loss for loss in loss_dict.values())
        records.append({"lr": optimizer.param_groups[0]["lr"], "losses": {k: v.item() for k, v in loss_dict.items()},
                        "ids": [t["image_id"] for t in targets], "images": [i.clone() for i in images]})
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        if len(records) == stop:
            return


def reference_run(dataset, imagenet, initial_state, rng_state, num_classes):
    backbone = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone.load_state_dict(imagenet)
    model = MaskRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=num_classes, min_size=MIN_SIZE, max_size=MAX_SIZE)
    model.load_state_dict(initial_state)  # the heads' random initialisation is not part of the recipe
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=0.9, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1, 2], gamma=0.1)
    aspect_ratios = [float(img["width"]) / float(img["height"]) for img in dataset.to_coco_dict()["images"]]
    group_ids = create_aspect_ratio_groups(aspect_ratios, k=3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{"params": [names[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"],
               "momentum": g["momentum"]} for g in optimizer.param_groups]
    torch.set_rng_state(rng_state)
    records, epoch = [], 0
    while len(records) < STEPS:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)  # torchrun, 1 process
        sampler.set_epoch(epoch)
        sampler = GroupedBatchSampler(sampler, group_ids, BATCH)
        loader = DataLoader(FlippedItems(dataset, epoch), batch_sampler=sampler, collate_fn=collate_fn,
                            generator=torch.Generator())  # its base seed not drawn from the global RNG, as the project's
        train_one_epoch(model, optimizer, loader, epoch, records, STEPS)
        lr_scheduler.step()
        epoch += 1
    return records, groups, model.state_dict()


# --- the project's run --------------------------------------------------------------------------

def padded_shapes(tmp_path):
    """export-shapes, then each image padded (bottom/right) to one of SIZES, its RLE masks re-encoded."""
    out = export_shapes(tmp_path / "shapes", num_images=len(SIZES), image_size=SHAPE, seed=1, max_objects=3, min_size=8,
                        max_size=20)
    path = out / "annotations.json"
    data = json.loads(path.read_text())
    for img, (h, w) in zip(data["images"], SIZES):
        image = read_rgb(out / "images" / img["file_name"])
        canvas = torch.zeros((3, h, w), dtype=torch.uint8)
        canvas[:, :image.shape[1], :image.shape[2]] = image
        write_png(canvas, out / "images" / img["file_name"])
        for ann in data["annotations"]:
            if ann["image_id"] == img["id"]:
                mask = np.zeros((h, w), np.uint8)
                mask[:SHAPE, :SHAPE] = decode_segmentation(ann["segmentation"], SHAPE, SHAPE)
                rle = mask_utils.encode(np.asfortranarray(mask))
                ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        img["height"], img["width"] = h, w
    path.write_text(json.dumps(data))
    return out


def imagenet_stand_in() -> dict:
    """A ResNet-50 state dict with realistic BatchNorm statistics (from random images) in place of IMAGENET1K_V1."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, zero_init_residual=True)  # blocks start as identities: tame features
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = this batch's
    with torch.no_grad():
        net(torch.randn(4, 3, 96, 96))  # images as the model normalises them
    return net.state_dict()


class Recorder(Hook):
    def __init__(self):
        self.records = []

    def before_train(self, trainer):
        self.initial = copy.deepcopy(trainer.model.state_dict())
        self.rng = torch.get_rng_state()

    def after_step(self, trainer, record):
        images, targets = trainer.last_batch
        self.records.append({"lr": record.lr, "losses": record.losses, "ids": [t["image_id"] for t in targets],
                             "images": [i.clone() for i in images]})


@pytest.mark.slow
def test_four_steps_equal_the_transcribed_reference_loop(tmp_path):
    data = padded_shapes(tmp_path)
    imagenet = imagenet_stand_in()
    torch.save(imagenet, tmp_path / "resnet50.pth")
    spec = f"{{type: coco, images: {data / 'images'}, annotations: {data / 'annotations.json'}}}"
    overrides = [f"data.train={spec}", f"data.val={spec}", f"model.backbone.weights={tmp_path / 'resnet50.pth'}",
                 f"model.transform.min_size={MIN_SIZE}", f"model.transform.max_size={MAX_SIZE}",
                 f"data.batch_size={BATCH}", "data.num_workers=0", f"train.seed={SEED}", "train.device=cpu",
                 "train.lr_scheduler.milestones=[1, 2]", f"train.iterations={STEPS}", "train.epochs=null",
                 "train.checkpoint_every=0", "eval.max_images=1", "eval.iou_types=[bbox]"]
    config = load_experiment(RECIPE, overrides).variants[0].config
    recorder = Recorder()
    trainer = Trainer(config, tmp_path / "out", hooks=[recorder], resume=False)
    assert trainer.iters_per_epoch == len(SIZES) // BATCH  # GroupedBatchSampler's length
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [{"params": [names[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"], "momentum": g["momentum"]}
              for g in trainer.optimizer.param_groups]
    trainer.fit()

    expected, reference_groups, reference_weights = reference_run(trainer.train_set, imagenet, recorder.initial, recorder.rng,
                                               config.model.num_classes)
    assert groups == reference_groups and len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
    assert len(groups[0]["params"]) == 84  # 3 trainable ResNet stages + FPN + heads; conv1 and layer1 frozen
    got = recorder.records
    assert [r["ids"] for r in got] == [r["ids"] for r in expected]
    bins = dict(zip([img["id"] for img in trainer.train_set.to_coco_dict()["images"]],
                    create_aspect_ratio_groups([w / h for h, w in SIZES], k=3)))
    assert all(len({bins[i] for i in r["ids"]}) == 1 for r in got)  # one aspect-ratio bin per batch
    assert any(len(set(r["ids"])) == 1 for r in got)  # a leftover completed by repeating its bin's images
    for g, e in zip(got, expected):
        assert all(torch.equal(a, b) for a, b in zip(g["images"], e["images"]))  # same images, same flips
        assert g["lr"] == pytest.approx(e["lr"], rel=1e-9, abs=1e-12)
        assert g["losses"].keys() == e["losses"].keys()
        for key in e["losses"]:
            assert g["losses"][key] == pytest.approx(e["losses"][key], abs=1e-6), key
    lrs = [r["lr"] for r in got]
    assert lrs == pytest.approx([LR * 0.001, LR * (0.001 + 0.999 / 2), LR, LR / 10], rel=1e-9)
    weights = trainer.model.state_dict()  # after the last step's update, the first at the dropped lr: bit for bit
    assert weights.keys() == reference_weights.keys()
    assert [k for k in weights if not torch.equal(weights[k], reference_weights[k])] == []
