"""rcnn-lab on one GPU, side by side in one process: training, inference, RoIAlign, the quickstart end to end.

The prepared command (from the repository root, with the project's dependencies installed: 7 minutes
of planned sections, 8 at most; it rewrites docs/benchmarks/gpu.md after every section, so a run cut
short still leaves what it measured)::

    PYTHONUNBUFFERED=1 timeout 480 python benchmarks/gpu_suite.py

    python benchmarks/gpu_suite.py --smoke      # tiny sizes on the CPU, under a minute; prints only

Sections, each time-boxed (planned seconds in ``FULL``) and failing soft (an error is recorded in
the report and the next section runs):

* environment: GPU, driver-side versions and every switch that changes speed;
* roi_align: ``differentiable_roi_align`` vs torchvision's ``MultiScaleRoIAlign``, forward +
  backward time and peak memory at ``benchmarks/roi_align_bench.py``'s shape, plus the
  box-gradient path (goal: <= 1.5x time, <= 2x memory);
* train: ``experiments/base.yaml`` (R50-FPN Mask R-CNN) on 800x1333 synthetic images with COCO's
  instance counts and sizes (``benchmarks/_coco_like.py``), 8 images per step: rcnn-lab's
  ``Trainer`` and a plain torchvision loop interleaved on the same batches
  (``benchmarks/train_step_bench.py``), for fp32, bf16 autocast and fp16 with ``GradScaler``, each
  with channels_last off and on, and bf16 with the box-gradient path; images/s, peak memory,
  the ratio framework / plain (goal <= 1.02) and the fp16 scale;
* inference: eval-mode images/s at batch 8 (fp32, bf16, bf16 + channels_last);
* quickstart: ``rcnn-lab run experiments/quickstart.yaml --device cuda`` in a subprocess with its
  own MLflow store: wall time and AP.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _coco_like  # noqa: E402,F401  (registers the coco_like dataset)
import roi_align_bench  # noqa: E402
import train_step_bench  # noqa: E402
from _publish import ROOT, publish  # noqa: E402
from _suite import Context, Section, run_sections, status_table  # noqa: E402
from _timing import device_sync  # noqa: E402

import rcnn_lab  # noqa: E402

REPORT = ROOT / "docs" / "benchmarks" / "gpu.md"
COMMAND = "PYTHONUNBUFFERED=1 timeout 480 python benchmarks/gpu_suite.py"
FULL_RUN_MARK = "<!-- gpu_suite: full run -->"
ANCHORS = [
    "NVIDIA DeepLearningExamples Mask R-CNN (PyTorch, A100, AMP): 23-24 training images/s per GPU",
    "torchvision's detection reference (Mask R-CNN R50-FPN): 0.2728 s/iteration on V100 at 2 images per GPU (7.3 images/s)",
    "goal on an H100/H200-class GPU, bf16: at least twice the A100 figure, >= 48 training images/s per GPU",
]


@dataclass(frozen=True)
class Plan:
    """Sizes of one mode of the suite."""

    height: int
    width: int
    batch: int
    pool: int
    warmup: int
    steps: int
    infer_batches: int
    roi_args: tuple[str, ...]
    quickstart_sets: tuple[str, ...]
    model_sets: tuple[str, ...]  # overrides of base.yaml's model (smoke: R18, FPN and heads narrowed as the tests' tiny model, few RoIs)
    settings: tuple[int, ...]  # indices into SETTINGS
    budgets: dict  # section name -> planned seconds
    total_s: float


FULL = Plan(800, 1333, 8, 16, 3, 10, 10, (), (), (), tuple(range(7)),
            {"environment": 5, "roi_align": 30, "train": 210, "inference": 35, "quickstart": 120}, 420)
SMOKE = Plan(64, 107, 2, 2, 1, 1, 1,
             ("--rois", "8", "--image", "128", "--channels", "8", "--repeat", "1", "--warmup", "0"),
             ("train.iterations=2", "data.train.num_images=4", "data.val.num_images=2", "train.log_every=1",
              "train.checkpoint_every=0", "eval.batch_size=2"),
             ("model.transform={min_size: 64, max_size: 107}", "model.backbone.depth=18", "model.rpn.pre_nms_top_n={train: 50, test: 20}",
              "model.rpn.post_nms_top_n={train: 20, test: 10}", "model.roi_heads.batch_size_per_image=8",
              "model.roi_heads.detections_per_img=4", "model.backbone.out_channels=64",
              "model.roi_heads.box_head={type: two_mlp, representation_size: 64}",
              "model.roi_heads.mask_head={type: conv_stack, layers: [32], dilation: 1}",
              "model.roi_heads.mask_predictor={type: mask_rcnn, dim_reduced: 32}"),
             # about a minute on an idle 2-core machine; the caps leave room for a busy one (the test suite's)
             (0, 3, 6), {"environment": 60, "roi_align": 120, "train": 400, "inference": 200, "quickstart": 400}, 1200)

# (label, train.amp, train.channels_last, extra overrides)
BOX_GRADIENT = ("model.roi_heads.box_pooler={type: differentiable_roi_align, output_size: 7, sampling_ratio: 2}",
                "model.roi_heads.mask_pooler={type: differentiable_roi_align, output_size: 14, sampling_ratio: 2}",
                "model.rpn.proposal_gradient=backprop")
SETTINGS = [("fp32", "none", False, ()), ("fp32", "none", True, ()), ("bf16", "bf16", False, ()), ("bf16", "bf16", True, ()),
            ("fp16 + GradScaler", "fp16", False, ()), ("fp16 + GradScaler", "fp16", True, ()),
            ("bf16, box-gradient path", "bf16", True, BOX_GRADIENT)]
GROWTH_INTERVAL = 4  # both loops' GradScaler grow the scale after 4 overflow-free steps (torch's default: 2000)


class Suite:
    def __init__(self, plan: Plan, device: torch.device, smoke: bool):
        self.plan, self.device, self.smoke = plan, device, smoke
        self.sync = device_sync(device)
        self.stamp = ""

    # --- configs ---------------------------------------------------------------------------------
    def overrides(self, amp: str, channels_last: bool, extra=()) -> list[str]:
        p, pin = self.plan, str(self.device.type == "cuda").lower()
        data = f"height: {p.height}, width: {p.width}, pool: {p.pool}, pin: {pin}"
        if self.smoke:
            data += ", mean_objects: 3.0, scale: 0.15"
        sets = [f"data.train={{type: coco_like, split: train, {data}}}",
                f"data.val={{type: coco_like, split: val, num_images: {p.pool}, {data}}}",
                "data.transforms=[]", f"data.batch_size={p.batch}", "train.iterations=1000", "train.checkpoint_every=0",
                f"train.device={self.device.type}", f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}"]
        return sets + list(p.model_sets) + list(extra)

    def config(self, amp: str = "none", channels_last: bool = False, extra=()):
        exp = rcnn_lab.load_experiment(ROOT / "experiments" / "base.yaml", self.overrides(amp, channels_last, extra))
        return exp.variants[0].config

    # --- sections --------------------------------------------------------------------------------
    def environment(self, ctx: Context) -> None:
        rows = roi_align_bench.machine(self.device)
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            rows += [("GPU memory", f"{props.total_memory / 2**30:.0f} GiB"), ("compute capability", f"{props.major}.{props.minor}"),
                     ("CUDA (torch build)", str(torch.version.cuda)), ("cuDNN", str(torch.backends.cudnn.version()))]
        rows += [("TF32 matmul / cuDNN", f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}"),
                 ("cudnn.benchmark / deterministic", f"{torch.backends.cudnn.benchmark} / {torch.backends.cudnn.deterministic}"),
                 ("float32 matmul precision", torch.get_float32_matmul_precision())]
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU (no GPU)"
        cuda = f"CUDA {torch.version.cuda}, " if self.device.type == "cuda" else ""
        self.stamp = f"_{name}; torch {torch.__version__}, {cuda}torchvision {torchvision.__version__}._"
        ctx.lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]

    def roi_align(self, ctx: Context) -> None:
        args, _ = roi_align_bench.parse_args([*self.plan.roi_args, "--device", self.device.type, "--no-memory",
                                              "--methods", "torchvision", "differentiable", "differentiable+boxes"])
        results = roi_align_bench.measure(args, self.device, deadline=ctx.deadline - 10)
        if self.device.type == "cuda":
            for method in args.methods:
                results[method]["peak_bytes"] = roi_align_bench.peak_memory(method, args, self.device)
        ref = results["torchvision"]
        ctx.lines += [self.stamp, "",
                      f"{args.batch} images of {args.image}x{args.image}, {args.rois} RoIs each, {args.levels} FPN levels, "
                      f"{args.channels} channels, output {args.size}x{args.size}, sampling_ratio {args.sampling_ratio}; "
                      f"median of {ref['runs']} forward + backward rounds (features require grad); peak memory: "
                      "`torch.cuda.max_memory_allocated` above the inputs. Goal: <= 1.5x time, <= 2x memory.", "",
                      "| method | box gradient | forward ms | fwd + bwd ms | vs torchvision | peak MiB | vs torchvision |",
                      "|---|---|---:|---:|---:|---:|---:|"]
        for method, r in results.items():
            peak = r.get("peak_bytes")
            mem = f"{peak / ref['peak_bytes']:.2f}x" if peak and ref.get("peak_bytes") else "n/a"
            ctx.lines.append(f"| {method} | {'yes' if method.endswith('boxes') else 'no'} | {r['forward_ms']:.2f} | "
                             f"{r['total_ms']:.2f} | {r['total_ms'] / ref['total_ms']:.2f}x | "
                             f"{'n/a' if peak is None else f'{peak / 2**20:.0f}'} | {mem} |")
        for method in ("differentiable", "differentiable+boxes"):
            r = results[method]
            time_goal = "met" if r["total_ms"] <= 1.5 * ref["total_ms"] else "not met"
            mem_goal = ("not measured" if not r.get("peak_bytes") or not ref.get("peak_bytes")
                        else "met" if r["peak_bytes"] <= 2 * ref["peak_bytes"] else "not met")
            ctx.lines.append(f"\n{self.goals()}, {method}: time <= 1.5x {time_goal}; memory <= 2x {mem_goal}.")

    def train(self, ctx: Context) -> None:
        p = self.plan
        ctx.lines += [self.stamp, "",
                      f"`experiments/base.yaml` (R50-FPN Mask R-CNN, 91 classes, no pretrained weights), SGD as configured, "
                      f"{p.batch} synthetic {p.height}x{p.width} images per step with COCO's instance counts and sizes "
                      f"(`benchmarks/_coco_like.py`: {p.pool} distinct images held in {'page-locked ' if self.device.type == 'cuda' else ''}"
                      f"memory, no augmentation). Both loops run interleaved step by step on the same batches "
                      f"(`benchmarks/train_step_bench.py`); {p.warmup} warm-up step(s), then up to {p.steps} timed step(s) each, "
                      "every step ended by a device synchronisation. Images/s: batch / median step. Ratio: median over "
                      "steps of framework / plain step time (goal <= 1.02). Peak: the loop's own parameters, gradients and "
                      "optimizer state plus the most its step allocated above the start (the other loop's model stays "
                      f"resident). fp16: both loops' `GradScaler` with growth_interval {GROWTH_INTERVAL}; scale before -> after "
                      "the run, skipped steps (overflow: scale halved, step skipped) and growths." + self.model_note(), "",
                      "| setting | autocast | channels_last | timed steps | framework img/s | plain img/s | ratio | "
                      "framework peak GiB | plain peak GiB | data ms | fp16 scale framework / plain |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        settings = [SETTINGS[i] for i in p.settings]
        figures: list[tuple[str, float, float]] = []  # (autocast, framework images/s, ratio)
        for i, (label, amp, channels_last, extra) in enumerate(settings):
            share = (ctx.deadline - time.perf_counter()) / (len(settings) - i)
            try:
                row, fig = self._train_row(label, amp, channels_last, extra, time.perf_counter() + share)
                ctx.lines.append(row)
                figures.append(fig)
            except Exception as exc:  # one setting's failure (an fp16 overflow, out of memory) leaves the others
                ctx.lines.append(f"| {label} | {amp} | {channels_last} | failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:160] if str(exc) else ''} | | | | | | | |")
            finally:
                self.free()
            ctx.flush()
        if figures:
            met = sum(r <= 1.02 for _, _, r in figures)
            bf16 = [x for a, x, _ in figures if a == "bfloat16"]
            best = f"{max(bf16):.1f} images/s ({'met' if max(bf16) >= 48 else 'not met'})" if bf16 else "no bf16 figure"
            ctx.lines += ["", f"{self.goals()}: framework / plain <= 1.02 in {met} of {len(figures)} settings; "
                              f"bf16 training >= 48 images/s per GPU: best {best}."]

    def _train_row(self, label, amp, channels_last, extra, deadline) -> str:
        p = self.plan
        config = self.config(amp, channels_last, extra)
        timer, plain, how, same = train_step_bench.interleaved(config, p.warmup + p.steps, 1, deadline=deadline,
                                                               at_least=p.warmup + 1, growth_interval=GROWTH_INTERVAL)
        fw, pl = timer.times.skip(p.warmup), plain.times.skip(p.warmup)
        scales = [_scale(timer.times.scale), _scale(plain.times.scale)]
        dtype = str(plain.amp_dtype).replace("torch.", "") if plain.amp_dtype else "off (float32)"
        ratio = statistics.median(f / q for f, q in zip(fw.wall, pl.wall))
        med = statistics.median
        row = (f"| {label} | {dtype} | {'on' if channels_last else 'off'} | {len(fw.wall)} | {p.batch / med(fw.wall):.1f} | "
               f"{p.batch / med(pl.wall):.1f} | {ratio:.3f} | {_gib(fw.peak)} | {_gib(pl.peak)} | {1e3 * med(fw.data):.1f} | "
               f"{' / '.join(scales) if scales[0] else 'n/a'} |")
        print(row, f"(plain model: {how}; same eval predictions: {same})", flush=True)
        del timer, plain
        return row, (dtype, p.batch / med(fw.wall), ratio)

    def inference(self, ctx: Context) -> None:
        from rcnn_lab.engine.trainer import resolve_amp
        from rcnn_lab.registry import DATASETS

        p = self.plan
        ctx.lines += [self.stamp, "",
                      f"Eval mode under `torch.inference_mode`, {p.batch} images of {p.height}x{p.width} per batch, forward "
                      "only (what `eval_images_per_s` times). `model.roi_heads.score_thresh: 0`: every image keeps "
                      "detections_per_img detections (an untrained model's scores fall below 0.05), so the mask head "
                      "and mask pasting run at their most." + self.model_note(), "",
                      "| autocast | channels_last | batches | images/s | peak GiB |", "|---|---|---:|---:|---:|"]
        for amp, channels_last in (("none", False), ("bf16", False), ("bf16", True)):
            config = self.config(amp, channels_last, ("model.roi_heads.score_thresh=0.0",))
            data = DATASETS.build(config.data.val, "data.val")
            images = [data[i][0].to(self.device) for i in range(p.batch)]
            model = rcnn_lab.build_model(config.model).to(self.device).eval()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            dtype = resolve_amp(amp, self.device, notify=False)
            times = []
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                for i in range(2 + p.infer_batches):
                    if i == 2 and self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                    self.sync()
                    tick = time.perf_counter()
                    model(images)
                    self.sync()
                    if i >= 2:
                        times.append(time.perf_counter() - tick)
                    if i >= 2 and time.perf_counter() > ctx.deadline - 5:
                        break
            peak = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}" if self.device.type == "cuda" else "n/a"
            name = str(dtype).replace("torch.", "") if dtype else "off (float32)"
            ctx.lines.append(f"| {name} | {'on' if channels_last else 'off'} | {len(times)} | "
                             f"{p.batch * len(times) / sum(times):.1f} | {peak} |")
            del model, images
            self.free()
            ctx.flush()

    def quickstart(self, ctx: Context) -> None:
        from rcnn_lab.report import runs

        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "RCNN_LAB_RUNS": tmp, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            env.pop("MLFLOW_TRACKING_URI", None)
            if self.smoke:
                env["OMP_NUM_THREADS"] = "1"
            cmd = [sys.executable, "-m", "rcnn_lab", "run", "experiments/quickstart.yaml", "--device", self.device.type,
                   "--no-progress", *[x for s in self.plan.quickstart_sets for x in ("--set", s)]]
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=max(1.0, ctx.left()))
            finally:
                if proc.poll() is None:  # timed out (here or by the suite's alarm): end it and its children
                    os.killpg(proc.pid, 9)
                    proc.wait()
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                raise RuntimeError(f"rcnn-lab run exited {proc.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}")
            df = runs("quickstart", tracking_uri=f"sqlite:///{Path(tmp).resolve() / 'mlflow.db'}")
        row = df.iloc[0]
        get = lambda k: f"{row[k]:.3f}" if k in row and row[k] == row[k] else "n/a"  # noqa: E731
        shown = " ".join(f"--set {s}" for s in self.plan.quickstart_sets)
        ctx.lines += [self.stamp, "",
                      f"`rcnn-lab run experiments/quickstart.yaml --device {self.device.type} --no-progress {shown}`".replace(" `", "`"),
                      "in a subprocess with its own MLflow store (sqlite), one run (seed 0): import, build, train, checkpoint, "
                      "evaluate and log, end to end.", "",
                      "| wall s | train s | MLflow status | mask AP50 | mask AP | box AP50 | box AP | eval images/s |",
                      "|---:|---:|---|---:|---:|---:|---:|---:|",
                      f"| {wall:.1f} | {get('train_time_s')} | {row['status']} | {get('segm_AP50')} | {get('segm_AP')} | "
                      f"{get('bbox_AP50')} | {get('bbox_AP')} | {get('eval_images_per_s')} |"]

    # --- plumbing --------------------------------------------------------------------------------
    def goals(self) -> str:
        return "Goals (read them on a GPU run only)" if self.smoke else "Goals"

    def model_note(self) -> str:
        return f" Model overrides: `{'`, `'.join(self.plan.model_sets)}`." if self.plan.model_sets else ""

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sections(self) -> list[Section]:
        b = self.plan.budgets
        return [Section("environment", "Environment", b["environment"], self.environment),
                Section("roi_align", "RoIAlign: differentiable_roi_align vs MultiScaleRoIAlign", b["roi_align"], self.roi_align),
                Section("train", "Training: Trainer vs a plain torchvision loop", b["train"], self.train),
                Section("inference", "Inference", b["inference"], self.inference),
                Section("quickstart", "Quickstart end to end (rcnn-lab run, MLflow included)", b["quickstart"], self.quickstart,
                        extend=True)]


def _scale(values: list[float]) -> str:
    """``first -> last (k skipped, g growths)`` of a GradScaler's per-step scales ('' when it was off)."""
    if not values:
        return ""
    skipped = sum(b < a for a, b in zip(values, values[1:]))
    grown = sum(b > a for a, b in zip(values, values[1:]))
    return f"{values[0]:g} -> {values[-1]:g} ({skipped} skipped, {grown} growths)"


def _gib(peaks: list) -> str:
    peaks = [x for x in peaks if x is not None]
    return f"{max(peaks) / 2**30:.1f}" if peaks else "n/a"


def render(suite: Suite, outcomes, command: str) -> str:
    if suite.smoke:
        status = ("**CPU smoke run: these are not GPU figures.** `--smoke` runs every section at tiny sizes on the CPU "
                  "to show that the suite still runs end to end. No GPU run has been made yet: until the command below "
                  "has run on a GPU, this smoke output is all this file holds.")
    else:
        status = f"GPU run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    lines = [FULL_RUN_MARK] if not suite.smoke else []
    lines += ["# GPU benchmark suite", "", status, "",
              f"Prepared command (repository root, one GPU, 7 minutes planned, 8 at most): `{COMMAND}`", "",
              f"This file was written by: `{command}`", "", "Anchors:", "", *[f"* {a}" for a in ANCHORS], "",
              "## Sections", "", *status_table(outcomes), ""]
    for o in outcomes:
        lines += [f"## {o.section.title}", ""]
        lines += o.lines if o.lines else [f"_{o.status}_"]
        if o.error:
            lines += ["", f"**{o.status}**: {o.error}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (under a minute); prints only unless --out")
    parser.add_argument("--out", type=Path, help=f"report path (default: {REPORT.relative_to(ROOT)}; --smoke: none)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections")
    parser.add_argument("--force", action="store_true", help="let --smoke overwrite a report that holds a GPU run")
    args = parser.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; run it on a GPU machine, or use --smoke for the CPU check", file=sys.stderr)
        return 2
    out = args.out if args.out or args.smoke else REPORT
    if args.smoke and out and out.exists() and FULL_RUN_MARK in out.read_text() and not args.force:
        print(f"gpu_suite: {out} holds a GPU run; a smoke run would replace it (--force to do so)", file=sys.stderr)
        return 2
    if args.smoke:  # one thread: on a busy machine, several would spend their time waiting for each other
        torch.set_num_threads(1)
    suite = Suite(SMOKE if args.smoke else FULL, torch.device("cpu" if args.smoke else "cuda"), args.smoke)
    sections = [s for s in suite.sections() if not args.only or s.name in args.only or s.name == "environment"]
    command = "python benchmarks/gpu_suite.py " + " ".join(raw)

    def write(outcomes) -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render(suite, outcomes, command.strip()))

    outcomes = run_sections(sections, suite.plan.total_s, on_update=write, after_each=suite.free)
    publish(render(suite, outcomes, command.strip()), out or REPORT, write=out is not None)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
