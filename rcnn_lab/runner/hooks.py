"""Training hooks that log to MLflow: batched (and by default asynchronous) metric logging."""

from __future__ import annotations

import time

from rcnn_lab.engine.hooks import Hook, Periods, Priority, StepRecord
from rcnn_lab.runner import tags


class MLflowHook(Hook):
    """Buffers per-step metrics and sends them with ``log_batch`` every ``every`` iterations.

    Asynchronous by default: ``log_batch(synchronous=False)`` queues the batch on MLflow's logging
    thread and returns at once; ``flush(synchronous=True)`` waits for every queued batch of this run.
    That happens at each step the trainer writes a checkpoint after (``periods``) and at the last
    step, so a run resumed from a checkpoint never misses the metrics of the steps it contains.
    Runs after every hook that adds to the step record (``Priority.LOG``).
    """

    priority = Priority.LOG

    def __init__(self, client, run_id: str, every: int, periods: Periods, asynchronous: bool = True):
        self.client, self.run_id, self.every, self.asynchronous = client, run_id, max(1, every), asynchronous
        self.periods = periods
        self.buffer: list = []
        self.pending: list = []  # RunOperations of queued async batches
        self.logged_through: dict[str, int] = {}  # resumed run: last step already stored, per probe key

    def _already_logged(self, key: str, step: int) -> bool:
        """A resumed run replays the steps after its checkpoint: those logged before the kill are not sent twice."""
        if key not in self.logged_through:
            history = self.client.get_metric_history(self.run_id, key)
            self.logged_through[key] = max((m.step for m in history), default=-1)
        return step <= self.logged_through[key]

    def before_train(self, trainer) -> None:
        if trainer.start_iteration == 0:  # a fresh run: nothing stored yet, no need to ask
            self.logged_through = {"loss": -1, "eval": -1}

    def _metric(self, key: str, value: float, step: int):
        from mlflow.entities import Metric

        return Metric(key, float(value), int(time.time() * 1000), step)

    def flush(self, synchronous: bool = False) -> None:
        from mlflow.entities import RunTag

        if self.buffer or synchronous:
            batch, self.buffer = self.buffer, []
            beat = [RunTag(tags.HEARTBEAT, str(int(time.time())))]
            for i in range(0, max(len(batch), 1), 1000):  # MLflow accepts at most 1000 metrics per batch
                op = self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], tags=beat if i == 0 else (),
                                           synchronous=not self.asynchronous)
                if op is not None:
                    self.pending.append(op)
        if synchronous:
            pending, self.pending = self.pending, []
            for op in pending:
                op.wait()

    def after_step(self, trainer, record: StepRecord) -> None:
        step = record.iteration
        if self._already_logged("loss", step):
            return
        m = self._metric
        self.buffer += [m(k, v, step) for k, v in record.losses.items()]
        self.buffer += [
            m("loss", record.total, step), m("lr", record.lr, step), m("data_time_s", record.data_time, step),
            m("step_time_s", record.step_time, step), m("images_per_s", record.images / max(record.step_time, 1e-9), step),
            m("peak_memory_mb", record.peak_memory_mb, step),
        ]
        self.buffer += [m(k, v, step) for k, v in record.extra.items()]
        if self.periods.checkpoints_after(step):
            # the trainer writes a checkpoint next: a resume starts from it, so what led to it must be stored first
            self.flush(synchronous=True)
        elif step % self.every == 0:
            self.flush()

    def log_final(self, metrics: dict[str, float], iteration: int) -> None:
        """Log the final evaluation as ``final/<name>`` at ``iteration`` and wait until it is stored."""
        self.buffer += [self._metric(f"{tags.FINAL_PREFIX}{k}", v, iteration) for k, v in metrics.items()]
        self.flush(synchronous=True)

    def after_eval(self, trainer, iteration, metrics, per_class) -> None:
        probe = next(iter(metrics), None)
        if "eval" not in self.logged_through and probe is not None:
            self.logged_through["eval"] = max((m.step for m in self.client.get_metric_history(self.run_id, probe)), default=-1)
        if iteration <= self.logged_through.get("eval", -1):
            return
        self.buffer += [self._metric(k, v, iteration) for k, v in metrics.items()]
        self.flush()

    def after_checkpoint(self, trainer, iteration, path) -> None:
        self.flush(synchronous=True)  # and the heartbeat

    def after_train(self, trainer, result) -> None:
        self.flush(synchronous=True)


class GalleryHook(Hook):
    """Logs the prediction gallery (``eval.gallery`` fixed validation images, ``engine.gallery``) at every evaluation.

    Each panel goes to MLflow as ``log_image(key="gallery/<image id>", step=iteration)``, so the run
    page's image view steps through the evaluations and compares runs image by image; the last
    evaluation's panels are also stored as ``gallery/<image id>.png`` (what ``rcnn-lab report --gallery`` reads).
    """

    def __init__(self, client, run_id: str, count: int):
        self.client, self.run_id, self.count = client, run_id, count

    def after_eval(self, trainer, iteration, metrics, per_class) -> None:
        from rcnn_lab.engine.gallery import draw_panel, gallery_indices

        result = trainer.last_eval
        if result is None or result.predictions is None:
            return
        by_image: dict[int, list] = {}
        for r in result.predictions.results:
            by_image.setdefault(int(r["image_id"]), []).append(r)
        evaluated = set(result.predictions.image_ids)
        final = iteration == trainer.total_iterations
        for index in gallery_indices(len(trainer.val_set), self.count, trainer.config.eval.max_images):
            image, target = trainer.val_set[index]
            image_id = int(target["image_id"])
            if image_id not in evaluated:
                continue
            panel = draw_panel(image, target, by_image.get(image_id, []), trainer.val_set.categories)
            self.client.log_image(self.run_id, panel, key=f"gallery/{image_id}", step=int(iteration), synchronous=True)
            if final:
                self.client.log_image(self.run_id, panel, artifact_file=f"gallery/{image_id}.png")
