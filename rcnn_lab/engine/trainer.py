"""The training loop. Read it top to bottom: build, (resume), iterate, checkpoint, evaluate."""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcnn_lab.config.schema import RunConfig
from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine import distributed
from rcnn_lab.engine.evaluator import eval_loader, score
from rcnn_lab.engine.hooks import Hook, Hooks, Periods, StepRecord
from rcnn_lab.engine.preflight import RunInputs, prepare
from rcnn_lab.errors import TrainingError, display_path
from rcnn_lab.registry import LR_SCHEDULERS, OPTIMIZERS, TRANSFORMS


@dataclass
class TrainResult:
    metrics: dict[str, float]
    per_class: dict
    iterations: int
    train_time_s: float
    resumed_from: int = 0
    history: list[dict] = field(default_factory=list)


def resolve_amp(amp: str, device: torch.device, notify: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``, or None for float32.

    CUDA: bf16 or fp16. CPU: bf16 where the CPU computes it natively (AVX512-BF16 or AMX; oneDNN
    then runs convolutions and matmuls in bf16); elsewhere, and
    for fp16 (no fast CPU kernels), the run stays in float32 and says so (``notify``: rank 0 only).
    """
    if amp == "none":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cuda":
        return dtype
    if device.type == "cpu" and amp == "bf16" and cpu_has_native_bf16():
        return dtype
    if notify:
        why = ("fp16 autocast has no fast CPU kernels" if amp == "fp16" else
               "this CPU has no native bf16 (AVX512-BF16 or AMX, with torch's AVX-512 kernels: "
               f"{torch.backends.cpu.get_cpu_capability()} here)")
        print(f"rcnn-lab: note: train.amp={amp} ignored on {device.type}: {why}; training in float32", file=sys.stderr, flush=True)
    return None


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX tiles) and torch's CPU kernels are not
    held below AVX-512 (``ATEN_CPU_CAPABILITY=avx2``): held there, bf16 is emulated and slower than float32, as on
    a CPU without AVX-512."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def nonfinite_hint(train) -> str:
    """What to try after a non-finite loss: clipping only when it is not already on."""
    if train.clip_grad_norm is None:
        return "lower the learning rate or enable train.clip_grad_norm"
    return f"lower the learning rate or train.clip_grad_norm (now {train.clip_grad_norm:g})"


class Trainer:
    """Train and evaluate one resolved config. Outputs (checkpoints) go to ``out_dir``."""

    def __init__(self, config: RunConfig, out_dir: str | Path, hooks: list[Hook] = (), resume: bool = True,
                 inputs: RunInputs | None = None):
        """``inputs``: the device and datasets ``preflight`` checked for this run (else checked here)."""
        from rcnn_lab.data.loader import batch_schedule, build_loader
        from rcnn_lab.models.builder import build_model

        inputs = inputs if inputs is not None else prepare(config)  # registers the built-ins too
        config = inputs.resolve(config)  # model.num_classes: auto -> 1 + data.train's categories
        self.config, self.out_dir = config, Path(out_dir)
        t, d = config.train, config.data
        self.world, self.device = distributed.setup(inputs.device)  # torchrun: this rank's device
        self.hooks = Hooks(hooks)
        self.train_set, self.val_set = inputs.train_set, inputs.val_set
        per_process = d.sampler == "per_process"  # each rank draws its share (data/loader.py)
        self.iters_per_epoch = batch_schedule(self.train_set, d.batch_size, True, d.group_aspect_ratio,
                                              d.aspect_ratio_group_factor, t.seed, True, per_process,
                                              self.world.rank, self.world.size).batches_per_epoch
        self.total_iterations = t.iterations if t.iterations is not None else t.epochs * self.iters_per_epoch
        self.periods = Periods.of(t, self.total_iterations)
        seed_everything(t.seed)
        model = build_model(config.model)
        # model.weights after seeding and building (tensors it does not cover keep the seed's values);
        # not when resuming (the run's own checkpoint wins). Every rank loads (DDP would broadcast rank 0's
        # tensors, but not FrozenBatchNorm2d's eps); a rank handed an unresolved run:<id> leaves it to that broadcast
        resuming = resume and ckpt.latest(ckpt.folder(self.out_dir)) is not None
        self.weights_report = None  # engine.weights.LoadReport of model.weights, when loaded here
        spec = inputs.weights or config.model.weights
        if spec is not None and not resuming:
            from rcnn_lab.engine.weights import apply, is_run

            if self.world.main or not is_run(spec):  # COCO class rows in data.train's label order (engine.weights.load)
                self.weights_report = apply(model, spec, categories=getattr(self.train_set, "categories", None))
        self.model = model.to(self.device)
        if t.channels_last:  # CUDA: tensor-core layouts; CPU: oneDNN's native layout (fast max-pool)
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp_model = distributed.wrap(self.model, self.device)  # DistributedDataParallel, or the model itself
        self.optimizer = OPTIMIZERS.build(t.optimizer, "train.optimizer", params=params)
        self.scheduler = LR_SCHEDULERS.build(t.lr_scheduler, "train.lr_scheduler", optimizer=self.optimizer,
                                             total_iters=self.total_iterations, iters_per_epoch=self.iters_per_epoch)
        self.amp_dtype = resolve_amp(t.amp, self.device, notify=self.world.main)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)

        transforms = [TRANSFORMS.build(s, f"data.transforms[{i}]") for i, s in enumerate(d.transforms)]
        self.start_iteration, self.history, self.elapsed_before = 0, [], 0.0
        self.last_eval = None  # the latest EvalResult (detections included): the gallery hook and the saved eval file read it
        self._started = time.perf_counter()
        if resume and self.world.main:  # this process owns the run: a killed writer's temp file is garbage
            ckpt.remove_stale_temps(ckpt.folder(self.out_dir))
        state = distributed.load_latest(ckpt.folder(self.out_dir)) if resume else None  # read by rank 0
        if state is not None:  # past the run's end it would be recorded FINISHED without training (runner/resume.py
            # refuses it before a sweep; this guards the library's own use)
            ckpt.check_iteration(state, self.total_iterations, display_path(ckpt.folder(self.out_dir)))
            self._restore(state)
        distributed.reseed(t.seed, self.start_iteration)  # per-rank sampler RNG (no-op for one process)
        pin = self.device.type == "cuda"  # page-locked batches: the .to(device, non_blocking=True) copies are then asynchronous
        self.train_loader = build_loader(
            self.train_set, d.batch_size, shuffle=True, num_workers=d.num_workers, transforms=transforms,
            group_aspect_ratio=d.group_aspect_ratio, aspect_ratio_group_factor=d.aspect_ratio_group_factor, seed=t.seed,
            infinite=True, start_iter=self.start_iteration,
            rank=self.world.rank, world_size=self.world.size, pin_memory=pin, per_process=per_process,
        )
        self.val_loader = eval_loader(config, self.val_set, self.device)  # this rank's share (all of it alone)

    # --- checkpoints --------------------------------------------------------------------------
    def state(self, iteration: int) -> dict:
        from rcnn_lab.engine.weights import EPS_KEY, frozen_bn_eps

        eps = frozen_bn_eps(self.model)  # not a tensor: torchvision's COCO_V1 weights run with 0.0 (engine/weights.py)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "iteration": iteration, "rng": ckpt.rng_state(), "history": self.history,
            "train_time_s": self.elapsed_before + time.perf_counter() - self._started,
            **({EPS_KEY: eps} if eps is not None else {}),
        }

    def _restore(self, state: dict) -> None:
        from rcnn_lab.engine.weights import EPS_KEY, set_frozen_bn_eps

        self.model.load_state_dict(state["model"])
        if isinstance(state.get(EPS_KEY), float):
            set_frozen_bn_eps(self.model, state[EPS_KEY])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.start_iteration, self.history = int(state["iteration"]), list(state.get("history", []))
        self.elapsed_before = float(state.get("train_time_s", 0.0))

    def save_checkpoint(self, iteration: int) -> Path:
        path = ckpt.path_for(ckpt.folder(self.out_dir), iteration)
        if not self.world.main:
            return path  # rank 0 alone writes checkpoints
        ckpt.save(path, self.state(iteration))
        for old in ckpt.saved(path.parent):
            if old != path:
                old.unlink(missing_ok=True)  # keep the newest only
        self.hooks.after_checkpoint(self, iteration, path)
        return path

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate(self, iteration: int):
        result = score(self.model, self.val_loader, self.val_set, self.config, self.device, self.amp_dtype)
        self.last_eval = result
        self.hooks.after_eval(self, iteration, result.metrics, result.per_class)
        return result

    # --- the loop -----------------------------------------------------------------------------
    def to_device(self, images, targets) -> tuple[list, list]:
        """A batch from the loader on this run's device."""
        d = self.device
        return ([img.to(d, non_blocking=True) for img in images],
                [{k: v.to(d, non_blocking=True) if torch.is_tensor(v) else v for k, v in tg.items()} for tg in targets])

    def step(self, images, targets, iteration: int) -> tuple[dict[str, float], float]:
        """One optimizer step on a batch already on the device; returns (losses averaged over ranks, lr used).

        Forward under ``train.amp`` autocast, the summed losses backward (scaled for fp16),
        ``train.clip_grad_norm``, the optimizer, then the per-iteration schedule. ``iteration``
        (1-based) names the step when a loss is not finite (``TrainingError``, on every rank).
        """
        model, clip = self.ddp_model, self.config.train.clip_grad_norm
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        values = distributed.mean(torch.stack([v.detach().float() for v in loss_dict.values()])).cpu()  # over ranks
        if not torch.isfinite(values).all():
            bad = [f"{k}={v:.4g}" for k, v in zip(loss_dict, values.tolist()) if not math.isfinite(v)]
            raise TrainingError(f"non-finite loss at iteration {iteration}: {', '.join(bad)}; {nonfinite_hint(self.config.train)}")

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return dict(zip(loss_dict, values.tolist())), lr

    def fit(self) -> TrainResult:
        periods = self.periods
        model = self.ddp_model
        model.train()
        self.hooks.before_train(self)
        self._started = time.perf_counter()
        stream = iter(self.train_loader)
        tick = time.perf_counter()
        for it in range(self.start_iteration, periods.iterations):
            step = it + 1
            images, targets = self.to_device(*next(stream))
            data_time = time.perf_counter() - tick
            self.last_batch = (images, targets)
            losses, lr = self.step(images, targets, step)
            record = StepRecord(step, losses, lr, data_time, time.perf_counter() - tick,
                                peak_memory_mb(self.device), len(images) * self.world.size)
            if periods.logs_after(step):
                self.history.append({"iteration": step, "lr": lr, "total": record.total, **record.losses,
                                     "data_time": data_time, "step_time": record.step_time,
                                     "peak_memory_mb": record.peak_memory_mb})
            self.hooks.after_step(self, record)
            if periods.checkpoints_after(step) and step < periods.iterations:  # the last one is written below
                self.save_checkpoint(step)
            if periods.evaluates_after(step):
                self.evaluate(step)
                model.train()
            tick = time.perf_counter()

        train_time = self.elapsed_before + time.perf_counter() - self._started
        last = periods.iterations
        if self.start_iteration < last or not ckpt.folder(self.out_dir).exists():
            self.save_checkpoint(last)
        final = self.evaluate(last)
        result = TrainResult({**final.metrics, "train_time_s": train_time}, final.per_class, last,
                             train_time, self.start_iteration, self.history)
        self.hooks.after_train(self, result)
        return result
