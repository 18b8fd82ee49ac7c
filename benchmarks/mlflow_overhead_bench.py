"""Cost of MLflow tracking on a training step: the real Trainer with and without ``MLflowHook``.

Run from the repository root (about 2 minutes on 2 CPU cores)::

    python benchmarks/mlflow_overhead_bench.py               # quickstart model, writes docs/benchmarks/mlflow_overhead.md
    python benchmarks/mlflow_overhead_bench.py --no-write    # print only
    python benchmarks/mlflow_overhead_bench.py --steps 30 --every 1   # longer, a batch every step

The store is sqlite in a temporary folder (the default kind of store). Runs with and without the
hook alternate in ABBA order (``--rounds`` of ``--steps`` timed steps each; the first step of a
round is a warm-up) so that load from other processes hits both alike. Per step:

* **CPU time** of the process, all threads: data, forward, backward, optimizer, hooks and whatever
  the journal's shipper thread did meanwhile. Unlike wall time it hardly depends on other processes.
* **wall time** between consecutive iterations (noisy on a shared machine).
* **hook time**: what the training thread itself spends in ``MLflowHook.after_step`` (building
  metrics, appending a batch to the run's journal every ``--every`` steps).
* **write time**: one batch journaled and stored synchronously, i.e. the work the journal's shipper thread does.

Hook time + write time per step, over the step time, bounds the overhead even if no logging work
overlapped with training; the end-to-end difference is also printed but is noisy on a shared machine.

The goal is an overhead of at most 2% of the step time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _publish import publish

from rcnn_lab.engine.hooks import Hook, Periods
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.engine.trainer import Trainer
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.hooks import MLflowHook
from rcnn_lab.runner.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks" / "mlflow_overhead.md"
CONFIG = ROOT / "experiments" / "quickstart.yaml"
GOAL = 0.02


class StepTimer(Hook):
    """Wall and process CPU time (all threads) between consecutive ``after_step`` calls; registered last,
    so a step includes the other hooks and whatever the journal's shipper thread did meanwhile."""

    def __init__(self):
        self.last, self.wall, self.cpu, self.record = None, [], [], None

    def after_step(self, trainer, record):
        now = (time.perf_counter(), time.process_time())
        if self.last is not None:
            self.wall.append(now[0] - self.last[0])
            self.cpu.append(now[1] - self.last[1])
        self.last, self.record = now, record


class Timed(Hook):
    """Forwards to ``inner`` and adds up the wall and thread CPU time spent in its ``after_step``."""

    def __init__(self, inner: MLflowHook):
        self.inner, self.wall, self.cpu, self.calls = inner, 0.0, 0.0, 0

    def after_step(self, trainer, record):
        start = (time.perf_counter(), time.thread_time())
        self.inner.after_step(trainer, record)
        self.wall += time.perf_counter() - start[0]
        self.cpu += time.thread_time() - start[1]
        self.calls += 1

    def after_train(self, trainer, result):
        self.inner.after_train(trainer, result)


def one_round(config, out: Path, client=None, exp_id=None, every: int = 20) -> tuple[StepTimer, Timed | None]:
    """Train ``config`` once (+ a final evaluation of 2 images, not timed)."""
    timer, timed = StepTimer(), None
    if client is not None:
        run = client.create_run(exp_id)
        journal = Journal(client, run.info.run_id, out / "tracking")
        timed = Timed(MLflowHook(journal, every, Periods.of(config.train), asynchronous=config.tracking.async_logging))
    Trainer(config, out, hooks=[*([timed] if timed else []), timer], resume=False).fit()
    if timed is not None:
        timed.inner.journal.end("FINISHED")
        timed.inner.journal.close(0)
    return timer, timed


def write_cost(client, exp_id: str, record, every: int, batches: int = 30) -> tuple[float, float]:
    """(wall, CPU) seconds of writing one batch of ``every`` steps synchronously: all the work the
    journal's shipper thread does for those steps."""
    run_id = client.create_run(exp_id).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(client, run_id, Path(tmp) / "tracking", start=False)  # shipped here, on this thread
        hook = MLflowHook(journal, every, Periods(iterations=10**9))
        trainer = None  # the hook reads nothing from the trainer
        wall = cpu = 0.0
        for b in range(batches):
            for i in range(1, every):
                hook.after_step(trainer, replace(record, iteration=b * every + i))
            start = (time.perf_counter(), time.process_time())
            hook.after_step(trainer, replace(record, iteration=(b + 1) * every))  # this one journals the batch
            journal.drain()  # and this stores it: the shipper thread's work
            wall += time.perf_counter() - start[0]
            cpu += time.process_time() - start[1]
        journal.end("FINISHED")
        journal.drain()
        journal.close(0)
    return wall / batches, cpu / batches


def run(steps: int, rounds: int, every: int, config_path: Path) -> dict:
    torch.set_num_threads(1)
    overrides = [f"train.iterations={steps + 1}", "train.checkpoint_every=0", "train.eval_every=0", "train.device=cpu",
                 "data.val.num_images=2"]
    config = load_experiment(config_path, overrides).variants[0].config
    with tempfile.TemporaryDirectory() as tmp:
        client = tr.client(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        exp_id = tr.experiment_id(client, "overhead", (Path(tmp) / "artifacts").as_uri())
        wall, cpu = {False: [], True: []}, {False: [], True: []}
        hook_wall = hook_cpu = 0.0
        hook_calls = 0
        for r in range(rounds):
            for with_hook in ((False, True) if r % 2 == 0 else (True, False)):  # ABBA order
                timer, timed = one_round(config, Path(tmp) / f"out{r}{with_hook}", client if with_hook else None,
                                         exp_id, every)
                wall[with_hook] += timer.wall
                cpu[with_hook] += timer.cpu
                if timed is not None:
                    hook_wall, hook_cpu, hook_calls = hook_wall + timed.wall, hook_cpu + timed.cpu, hook_calls + timed.calls
        batch_wall, batch_cpu = write_cost(client, exp_id, timer.record, every)
    mean, med = statistics.fmean, statistics.median
    step_wall, step_cpu = med(wall[False]), mean(cpu[False])
    res = dict(steps=steps, rounds=rounds, every=every, timed_steps=len(wall[False]), config=config_path.name,
               log_every=config.train.log_every,
               metrics_per_step=len(timer.record.losses) + 6, load=os.getloadavg()[0],
               step_wall=step_wall, step_cpu=step_cpu, on_wall=med(wall[True]), on_cpu=mean(cpu[True]),
               hook_wall=hook_wall / hook_calls, hook_cpu=hook_cpu / hook_calls,
               write_wall=batch_wall / every, write_cpu=batch_cpu / every)
    res["bound_cpu"] = (res["hook_cpu"] + res["write_cpu"]) / step_cpu
    res["bound_wall"] = (res["hook_wall"] + res["write_wall"]) / step_wall
    scale = every / res["log_every"]  # the same batch write, spread over the config's log_every steps
    res["config_cpu"] = (res["hook_cpu"] + res["write_cpu"] * scale) / step_cpu
    res["config_wall"] = (res["hook_wall"] + res["write_wall"] * scale) / step_wall
    return res


def render(res: dict, command: str) -> str:
    ok = max(res["bound_cpu"], res["bound_wall"]) <= GOAL
    ok_config = max(res["config_cpu"], res["config_wall"]) <= GOAL
    env = (f"CPU: {platform.machine()}, {os.cpu_count()} logical cores (1 torch thread), load average "
           f"{res['load']:.1f} at the end; Python {platform.python_version()}, torch {torch.__version__}, "
           f"mlflow {__import__('mlflow').__version__}")

    def ms(x: float) -> str:
        return f"{x * 1e3:.2f} ms"

    def pct(x: float, base: float) -> str:
        return f"{x / base * 100:+.2f} %"

    return f"""# MLflow logging overhead

Generated by `{command}`. {env}.

Model: `experiments/{res['config']}` on CPU, {res['metrics_per_step']} metrics per step, sqlite store in a temporary
folder, one batch journaled and stored in the background every {res['every']} steps ({res['log_every'] / res['every']:.3g}x more often than the config's `log_every: {res['log_every']}`).
{res['rounds']} rounds x {res['steps']} timed steps with and without `MLflowHook`, alternating ABBA.

| per training step | wall | CPU | share of a step (wall / CPU) |
|---|---:|---:|---:|
| step without tracking (median wall, mean CPU of all threads) | {ms(res['step_wall'])} | {ms(res['step_cpu'])} | |
| `MLflowHook.after_step` on the training thread | {ms(res['hook_wall'])} | {ms(res['hook_cpu'])} | {pct(res['hook_wall'], res['step_wall'])} / {pct(res['hook_cpu'], res['step_cpu'])} |
| writing the metrics to the store (one batch / {res['every']}, timed synchronously) | {ms(res['write_wall'])} | {ms(res['write_cpu'])} | {pct(res['write_wall'], res['step_wall'])} / {pct(res['write_cpu'], res['step_cpu'])} |
| **all logging work, even if it all ran on the training thread** | | | **{res['bound_wall'] * 100:.2f} % / {res['bound_cpu'] * 100:.2f} %** |
| end to end: step with tracking minus without (noisy) | {ms(res['on_wall'] - res['step_wall'])} | {ms(res['on_cpu'] - res['step_cpu'])} | {pct(res['on_wall'] - res['step_wall'], res['step_wall'])} / {pct(res['on_cpu'] - res['step_cpu'], res['step_cpu'])} |

Goal: at most {GOAL * 100:.0f} % of the step time for all logging work. At this cadence (a batch every
{res['every']} steps): **{'met' if ok else 'NOT met'}**. At the config's own `log_every: {res['log_every']}` (the same hook
cost per step, the batch write spread over {res['log_every']} steps): {res['config_wall'] * 100:.2f} % / {res['config_cpu'] * 100:.2f} %,
**{'met' if ok_config else 'NOT met'}**.

The training thread only builds the metric points and appends one line to the run's journal
(`runner/journal.py`) every `tracking.log_every` steps (default `train.log_every`); the journal's
shipper thread stores them with `log_batch`, so the write costs the training thread nothing unless
the cores are busy, and nothing at all waits for the store (an outage does not stop training). Before
a checkpoint and at the last step the journal is fsynced (so a resume never misses metrics), which
the hook row includes. The end-to-end difference of two training runs is within their round-to-round
noise on a shared machine (several percent of wall time, a percent or two of CPU time); the rows
above time the logging work itself.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round (default 12)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds with and without the hook (default 2)")
    parser.add_argument("--every", type=int, default=4,
                        help="log_batch every N steps (default 4: more often than the quickstart's log_every)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="experiment file (default experiments/quickstart.yaml)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not write {REPORT.relative_to(ROOT)}")
    args = parser.parse_args()
    tr.quiet_mlflow()
    res = run(args.steps, args.rounds, args.every, args.config)
    cmd = "python benchmarks/mlflow_overhead_bench.py" + "".join(
        f" --{k} {getattr(args, k)}" for k in ("steps", "rounds", "every") if getattr(args, k) != parser.get_default(k))
    text = render(res, cmd)
    publish(text, REPORT, write=not args.no_write)


if __name__ == "__main__":
    main()
