"""Training-step overhead of rcnn-lab's ``Trainer`` against a plain hand-written torchvision loop.

Run from the repository root::

    python benchmarks/train_step_bench.py                                # quickstart, 30 steps each
    python benchmarks/train_step_bench.py --iterations 20 --threads 1    # writes docs/benchmarks/train_step.md
    python benchmarks/train_step_bench.py --no-write                     # prints only

* framework: the real ``Trainer.fit`` loop with the hooks ``rcnn-lab run`` installs, minus MLflow
  (progress bar, and the gradient probe when ``train.grad_probe_every`` is set).
* plain: a ``torchvision.models.detection.MaskRCNN`` built from torchvision's own constructors
  with the config's kwargs, loaded with the framework model's initial ``state_dict`` (strict, so
  the module structure is identical), trained by a loop written the way torchvision's reference
  script does it: ``model(images, targets)``, ``sum``, ``.item()`` + finiteness check,
  ``zero_grad``, ``backward``, ``clip_grad_norm_`` when the config clips, ``step`` of the config's
  optimizer class (SGD or AdamW, same lr, weight decay and ``fused``), LambdaLR ``step``.

Both loops read the same batches (the same seeded ``build_loader`` stream, same transforms). The
CPU may be shared, so the loops run interleaved in alternating blocks of ``--block`` steps (the
plain block runs inside a hook of the framework loop, outside its timed intervals), which spreads
background load evenly over both. The first ``--warmup`` steps of each loop are not timed.
A framework step is the time between the ends of consecutive hook calls: everything the
trainer does for one iteration (data, forward, backward, optimizer, bookkeeping, its hooks).
Steps are timed in wall time and in process CPU time; the headline ratio is the median over
steps of the CPU-time ratio of step i of both loops (same batch, adjacent in time), which leaves
out time spent waiting for a core on a shared machine. A second pass runs both loops around a
stub model to measure the loop's own overhead per step in milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from _publish import publish
from _timing import Memory, Times, device_sync

import rcnn_lab
from rcnn_lab.data.loader import build_loader
from rcnn_lab.engine.hooks import Hook, Periods, ProgressHook
from rcnn_lab.engine.trainer import Trainer
from rcnn_lab.registry import DATASETS, TRANSFORMS

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks" / "train_step.md"


class _Done(Exception):
    """Ends the framework loop once enough steps are timed (skips the final checkpoint and evaluation)."""


def torchvision_model(config, reference: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The config's model from torchvision constructors, with ``reference``'s weights (strict load).

    Configs outside torchvision's own parts fall back to a deep copy of ``reference``.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    m, h, r = config.model, config.model.roi_heads, config.model.rpn
    bb, pools = m.backbone.kwargs, (h.box_pooler, h.mask_pooler)
    supported = (
        m.backbone.type == "resnet_fpn" and bb.get("weights") is None and bb.get("norm") in (None, "batchnorm")
        and bb.get("blocks") is None
        and bb.get("out_channels", 256) == 256 and bb.get("extra_block", "maxpool") == "maxpool"
        and m.anchor_generator.type == "grid" and r.head.type == "conv" and r.proposal_gradient == "detach"
        and all(p is not None and p.type == "multiscale_roi_align" and not p.kwargs.get("aligned", False)
                and p.kwargs.get("canonical_scale", 224) == 224 and p.kwargs.get("canonical_level", 4) == 4 for p in pools)
        and h.box_head.type == "two_mlp" and h.box_predictor.type == "fast_rcnn"
        and h.mask_head.type == "conv_stack" and h.mask_head.kwargs.get("norm", "none") == "none"
        and h.mask_predictor.type == "mask_rcnn"
    )
    if not supported:
        return copy.deepcopy(reference), "deep copy of the framework model (config not expressible with torchvision constructors)"
    returned = list(bb.get("returned_layers", [1, 2, 3, 4]))
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{bb.get('depth', 50)}", weights=None, norm_layer=torch.nn.BatchNorm2d,
                                   trainable_layers=bb.get("trainable_layers") if bb.get("trainable_layers") is not None else 5,
                                   returned_layers=returned, extra_blocks=LastLevelMaxPool())
    names = [str(i) for i in range(len(returned))]
    a = m.anchor_generator.kwargs
    sizes = tuple(tuple(s) for s in a.get("sizes", [[32], [64], [128], [256], [512]]))
    ratios = [tuple(x) for x in a.get("aspect_ratios", [[0.5, 1.0, 2.0]])]
    ratios = tuple(ratios * len(sizes) if len(ratios) == 1 else ratios)
    box_pool = MultiScaleRoIAlign(names, h.box_pooler.kwargs.get("output_size", 7), h.box_pooler.kwargs.get("sampling_ratio", 2))
    mask_pool = MultiScaleRoIAlign(names, h.mask_pooler.kwargs.get("output_size", 14), h.mask_pooler.kwargs.get("sampling_ratio", 2))
    res = box_pool.output_size[0]
    rep = h.box_head.kwargs.get("representation_size", 1024)
    layers = list(h.mask_head.kwargs.get("layers", [256, 256, 256, 256]))
    t = m.transform
    model = MaskRCNN(
        backbone, num_classes=None, min_size=t.min_size if isinstance(t.min_size, int) else tuple(t.min_size),
        max_size=t.max_size, image_mean=list(t.image_mean), image_std=list(t.image_std), size_divisible=t.size_divisible,
        rpn_anchor_generator=AnchorGenerator(sizes, ratios),
        rpn_head=RPNHead(256, len(ratios[0]) * len(sizes[0]), conv_depth=r.head.kwargs.get("conv_depth", 1)),
        rpn_pre_nms_top_n_train=r.pre_nms_top_n.train, rpn_pre_nms_top_n_test=r.pre_nms_top_n.test,
        rpn_post_nms_top_n_train=r.post_nms_top_n.train, rpn_post_nms_top_n_test=r.post_nms_top_n.test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.fg_iou_thresh, rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        rpn_score_thresh=r.score_thresh,
        box_roi_pool=box_pool, box_head=TwoMLPHead(256 * res * res, rep), box_predictor=FastRCNNPredictor(rep, m.num_classes),
        box_score_thresh=h.score_thresh, box_nms_thresh=h.nms_thresh, box_detections_per_img=h.detections_per_img,
        box_fg_iou_thresh=h.fg_iou_thresh, box_bg_iou_thresh=h.bg_iou_thresh,
        box_batch_size_per_image=h.batch_size_per_image, box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=h.bbox_reg_weights,
        mask_roi_pool=mask_pool, mask_head=MaskRCNNHeads(256, layers, h.mask_head.kwargs.get("dilation", 1)),
        mask_predictor=MaskRCNNPredictor(layers[-1], h.mask_predictor.kwargs.get("dim_reduced", 256), m.num_classes),
    )
    model.load_state_dict(reference.state_dict(), strict=True)  # same names and shapes: the same structure
    for p, q in zip(model.parameters(), reference.parameters()):
        p.requires_grad_(q.requires_grad)
    return model, "torchvision constructors (`MaskRCNN`, `resnet_fpn_backbone`, ...), framework weights loaded strictly"


class PlainLoop:
    """A hand-written torchvision training loop over the same batch stream as the trainer.

    As torchvision's reference script: autocast around the forward, and with fp16 a ``GradScaler``
    (``scale(loss).backward()``, ``unscale_`` before clipping, ``step``, ``update``); the model in
    channels_last when the config asks for it.
    """

    def __init__(self, config, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None):
        t, d = config.train, config.data
        self.amp_dtype = amp_dtype  # the trainer's resolved train.amp (reference script: autocast around the forward)
        train_set = DATASETS.build(d.train, "data.train")  # its own instance: no shared image cache
        self.model, self.device = model.to(device).train(), device
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
        self.sync = device_sync(device)
        o = t.optimizer.kwargs
        params = [p for p in model.parameters() if p.requires_grad]
        if t.optimizer.type == "adamw":  # the config's optimizer class and settings, written out by hand
            self.optimizer = torch.optim.AdamW(params, lr=o.get("lr", 1e-4), weight_decay=o.get("weight_decay", 0.05),
                                               fused=o.get("fused") or None)
        else:
            self.optimizer = torch.optim.SGD(params, lr=o.get("lr", 0.02), momentum=o.get("momentum", 0.9),
                                             weight_decay=o.get("weight_decay", 1e-4), fused=o.get("fused") or None)
        s = t.lr_scheduler.kwargs
        warmup, factor = s.get("warmup_iters", 0), s.get("warmup_factor", 0.001)
        steps = [int(x * t.iterations) for x in s.get("milestones", [0.67, 0.89])]

        def lr_lambda(it: int) -> float:
            w = 1.0 if it >= warmup else factor * (1 - it / warmup) + it / warmup
            return w * s.get("gamma", 0.1) ** sum(it >= m for m in steps)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        transforms = [TRANSFORMS.build(spec) for spec in d.transforms]
        self.stream = iter(build_loader(train_set, d.batch_size, shuffle=True, transforms=transforms, seed=t.seed, infinite=True,
                                        pin_memory=device.type == "cuda"))  # the trainer's loader pins on CUDA too
        self.params, self.clip = params, t.clip_grad_norm
        self.times = Times()
        self.memory = Memory(device, self.model, self.optimizer)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.sync()
            self.memory.start()
            start, cpu = time.perf_counter(), time.process_time()
            images, targets = next(self.stream)
            images = [img.to(self.device) for img in images]
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in tg.items()} for tg in targets]
            loaded = time.perf_counter()
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss_dict = self.model(images, targets)
            losses = sum(loss_dict.values())
            loss_value = losses.item()
            if not math.isfinite(loss_value):
                sys.exit(f"plain loop: loss is {loss_value}")
            self.optimizer.zero_grad()
            if self.scaler.is_enabled():  # torchvision's reference script with --amp (fp16)
                self.scaler.scale(losses).backward()
                if self.clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                losses.backward()
                if self.clip is not None:  # torchvision's reference script: --clip-grad-norm
                    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
                self.optimizer.step()
            self.scheduler.step()
            self.sync()
            self.times.add(time.perf_counter() - start, time.process_time() - cpu, loaded - start)
            self.times.peak.append(self.memory.stop())
            if self.scaler.is_enabled():
                self.times.scale.append(self.scaler.get_scale())


class Interleave(Hook):
    """Times framework steps and runs a plain block after every ``block`` framework steps.

    ``deadline`` (a ``time.perf_counter()`` value): the run ends at the first block boundary after
    it once ``at_least`` framework steps are done, both loops having run the same number of steps.
    """

    def __init__(self, plain: PlainLoop, total: int, block: int, deadline: float | None = None, at_least: int = 1):
        self.plain, self.total, self.block, self.deadline, self.at_least = plain, total, block, deadline, at_least
        self.times = Times()
        self.last_exit = (0.0, 0.0)
        self.memory: Memory | None = None

    def before_train(self, trainer) -> None:
        self.sync = device_sync(trainer.device)
        self.memory = Memory(trainer.device, trainer.model, trainer.optimizer)
        self.memory.start()
        self.last_exit = (time.perf_counter(), time.process_time())

    def after_step(self, trainer, record) -> None:
        self.sync()  # the step's queued GPU work belongs to the step
        wall, cpu = time.perf_counter(), time.process_time()
        self.times.add(wall - self.last_exit[0], cpu - self.last_exit[1], record.data_time)
        self.times.peak.append(self.memory.stop())
        if trainer.scaler.is_enabled():
            self.times.scale.append(trainer.scaler.get_scale())
        done = len(self.times.wall)
        if self.deadline is not None and done >= self.at_least and done % self.block == 0 and time.perf_counter() > self.deadline:
            self.total = done
        if done % self.block == 0 or done == self.total:
            self.plain.run(min(self.block, self.total - len(self.plain.times.wall)))
        if done == self.total:
            raise _Done
        self.sync()
        self.memory.start()
        self.last_exit = (time.perf_counter(), time.process_time())


LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class StubDetector(torch.nn.Module):
    """Five losses from one tiny parameter: leaves only the loop's own cost in a step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.0, len(LOSS_NAMES)))

    def forward(self, images, targets=None):
        x = self.w * torch.stack([img.mean() for img in images]).mean()
        return dict(zip(LOSS_NAMES, x.unbind()))


def interleaved(config, total: int, block: int, stub: bool = False, deadline: float | None = None, at_least: int = 1,
                growth_interval: int | None = None):
    """Run both loops for ``total`` steps in alternating blocks; returns (timer, plain, model note, same outputs).

    ``deadline``/``at_least``: see :class:`Interleave`. ``growth_interval``: both loops' fp16
    ``GradScaler`` grow their scale after that many overflow-free steps (torch's default: 2000).
    """
    with tempfile.TemporaryDirectory() as tmp:
        hooks = [ProgressHook(Periods.of(config.train), bar=sys.stderr.isatty(), lines=False, desc="framework")]
        if config.train.grad_probe_every and not stub:
            from rcnn_lab.runner.artifacts import GradNormHook

            hooks.append(GradNormHook(config.train.grad_probe_every))
        trainer = Trainer(config, tmp, hooks=hooks, resume=False)
        same = None
        if stub:  # the trainer's loop around a model that costs nothing
            trainer.model = trainer.ddp_model = StubDetector()
            trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.01, momentum=0.9)
            trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda it: 1.0)
            plain_model, how = copy.deepcopy(trainer.model), "stub"
        else:
            plain_model, how = torchvision_model(config, trainer.model)
        plain = PlainLoop(config, plain_model, trainer.device, trainer.amp_dtype)
        if growth_interval is not None:
            for loop in (trainer, plain):
                loop.scaler = torch.amp.GradScaler(trainer.device.type, growth_interval=growth_interval,
                                                   enabled=loop.scaler.is_enabled())
        if not stub:
            check = [img.to(trainer.device) for img in next(iter(build_loader(trainer.val_set, 2)))[0]]
            with torch.no_grad():  # same structure and weights: same predictions
                a, b = trainer.model.eval()(check), plain.model.eval()(check)
            same = all(x["boxes"].shape == y["boxes"].shape and torch.allclose(x["boxes"], y["boxes"], atol=1e-4)
                       for x, y in zip(a, b))
            trainer.model.train(), plain.model.train()
        timer = Interleave(plain, total, block, deadline, at_least)
        trainer.hooks.hooks.append(timer)  # last: the trainer's own hooks are inside its timed steps
        try:
            trainer.fit()
        except _Done:
            pass
    return timer, plain, how, same



def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores (torch threads: {torch.get_num_threads()}); Python "
            f"{platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/quickstart.yaml", help="experiment YAML (its first variant)")
    p.add_argument("--iterations", type=int, default=30, help="timed steps per loop (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per loop")
    p.add_argument("--block", type=int, default=1, help="steps per alternating block")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--overhead-steps", type=int, default=300, help="steps of the stub-model loop-overhead measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {REPORT.relative_to(ROOT)}")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = rcnn_lab.load_experiment(args.config, [*args.set, f"train.device={args.device}"])
    config = exp.variants[0].config
    total = args.warmup + args.iterations

    timer, plain, how, same = interleaved(config, total, args.block)
    fw, pl = timer.times.skip(args.warmup), plain.times.skip(args.warmup)
    stub_timer, stub_plain, _, _ = interleaved(config, args.warmup + args.overhead_steps, args.block, stub=True)
    sfw, spl = stub_timer.times.skip(args.warmup), stub_plain.times.skip(args.warmup)

    # step i of both loops trains on the same batch, at nearly the same time: per-step ratios cancel
    # batch-to-batch variation and most background load; CPU time leaves out time spent descheduled
    cpu_ratio = statistics.median(f / q for f, q in zip(fw.cpu, pl.cpu))
    wall_ratio = statistics.median(f / q for f, q in zip(fw.wall, pl.wall))
    overhead_ms = 1e3 * statistics.median(f - q for f, q in zip(sfw.cpu, spl.cpu))
    med = statistics.median
    command = "python benchmarks/train_step_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    table = ["| loop | median step, wall (s) | median step, CPU (s) | median data, wall (s) |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {med(t.wall):.4f} | {med(t.cpu):.4f} | {med(t.data):.4f} |"
              for name, t in (("framework (`Trainer.fit`)", fw), ("plain torchvision loop", pl))]
    text = "\n".join([
        "# Training-step overhead: `Trainer` vs a plain torchvision loop", "",
        f"Generated by `{command.strip()}`.", "",
        f"Machine: {machine()}.", "",
        f"Config: `{Path(args.config).as_posix()}` (first variant), batch {config.data.batch_size}, "
        f"{args.iterations} timed steps per loop after {args.warmup} warm-up steps, alternating blocks of {args.block}; "
        f"both loops under autocast {str(plain.amp_dtype).replace('torch.', '') if plain.amp_dtype else 'off (float32)'}.",
        f"Plain model: {how}; eval predictions identical to the framework model's: {same}.", "",
        *table, "",
        f"**Ratio framework / plain: {cpu_ratio:.3f}** (goal <= 1.02): median over steps of the CPU-time ratio, "
        f"step i of both loops on the same batch. The same on wall time: {wall_ratio:.3f}; ratio of the "
        f"median wall steps: {med(fw.wall) / med(pl.wall):.3f}.", "",
        f"Loop overhead alone: both loops around a stub model (five losses from one parameter, same batches), "
        f"{args.overhead_steps} steps each: the trainer costs **{overhead_ms:+.3f} ms CPU per step** more than the "
        f"plain loop (median of per-step differences), {overhead_ms / 1e3 / med(pl.cpu):.3%} of a plain step above.", "",
        "Step = data loading + forward + backward + optimizer and scheduler step + the loop's bookkeeping",
        "(the trainer's loss check, `StepRecord`, history, its hooks). CPU time is the process's (all threads),",
        "so it leaves out time the process waited for a core; on a shared machine it is the steadier measure.",
        "Wall-clock figures from a busy machine are noisy even interleaved.", "",
    ])
    publish(text, REPORT, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
