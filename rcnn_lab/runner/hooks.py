"""Training hooks that log to MLflow through the run's journal (``runner.journal``): training never waits for the store."""

from __future__ import annotations

import time

from rcnn_lab.engine.hooks import Hook, Periods, Priority, StepRecord
from rcnn_lab.runner import tags


def defined(metrics: dict[str, float]) -> dict[str, float]:
    """Evaluation metrics without COCOeval's -1 ("no ground truth in this size range", e.g. ``bbox_APl`` on small
    images): logged, it would read as a score and drag charts and means; absent, it is not a number at all."""
    return {k: v for k, v in metrics.items() if not (v == -1 and ("_AP" in k or "_AR" in k))}


class MLflowHook(Hook):
    """Buffers per-step metrics and hands them to the run's :class:`~rcnn_lab.runner.journal.Journal`
    every ``every`` iterations; the journal stores them in MLflow from a background thread.

    Training never waits for the store: before each step the trainer writes a checkpoint after
    (``periods``) the journal is put on disk (fsync), so a run resumed from a checkpoint never misses
    the metrics of the steps it contains, whether or not the store answered. ``asynchronous=False``
    (``tracking.async_logging: false``) also waits at every flush until the batch is stored, unless
    the store is found unreachable. Runs after every hook that adds to the step record (``Priority.LOG``).
    """

    priority = Priority.LOG

    def __init__(self, journal, every: int, periods: Periods, asynchronous: bool = True):
        self.journal, self.every, self.asynchronous = journal, max(1, every), asynchronous
        self.client, self.run_id = journal.client, journal.run_id
        self.periods = periods
        self.buffer: list = []
        self.logged_through: dict[str, int] = {}  # resumed run: last step already stored, per probe key

    def _already_logged(self, key: str, step: int) -> bool:
        """A resumed run replays the steps after its checkpoint: those logged before the kill are not sent twice."""
        if key not in self.logged_through:
            history = self.client.get_metric_history(self.run_id, key)
            self.logged_through[key] = max((m.step for m in history), default=-1)
        return step <= self.logged_through[key]

    def before_train(self, trainer) -> None:
        # the trainer's periods: a train.epochs run's length (so its last checkpoint) is known only once its data is
        self.periods = getattr(trainer, "periods", self.periods)
        if trainer.start_iteration == 0:  # a fresh run: nothing stored yet, no need to ask
            self.logged_through = {"loss": -1, "eval": -1}

    @staticmethod
    def _point(key: str, value: float, step: int) -> tuple:
        return key, float(value), int(time.time() * 1000), int(step)

    def flush(self, synchronous: bool = False, step_metrics: bool = True) -> None:
        """Hand the buffered points to the journal; ``synchronous``: and put them on disk."""
        batch, self.buffer = self.buffer, []
        self.journal.metrics(batch, step_metrics=step_metrics)
        if synchronous:
            self.journal.sync()
        if not self.asynchronous:
            self.journal.wait_stored()

    def after_step(self, trainer, record: StepRecord) -> None:
        step = record.iteration
        if self._already_logged("loss", step):
            return
        p = self._point
        self.buffer += [p(k, v, step) for k, v in record.losses.items()]
        self.buffer += [
            p("loss", record.total, step), p("lr", record.lr, step), p("data_time_s", record.data_time, step),
            p("step_time_s", record.step_time, step), p("images_per_s", record.images / max(record.step_time, 1e-9), step),
            p("peak_memory_mb", record.peak_memory_mb, step),
        ]
        self.buffer += [p(k, v, step) for k, v in record.extra.items()]
        if self.periods.checkpoints_after(step):
            # the trainer writes a checkpoint next: a resume starts from it, so what led to it must be kept first
            self.flush(synchronous=True)
        elif step % self.every == 0:
            self.flush()

    def log_final(self, metrics: dict[str, float], iteration: int) -> None:
        """Log the final evaluation as ``final/<name>`` at ``iteration`` (kept even when the journal is full)."""
        self.flush()
        self.buffer = [self._point(f"{tags.FINAL_PREFIX}{k}", v, iteration) for k, v in defined(metrics).items()]
        self.flush(synchronous=True, step_metrics=False)

    def after_eval(self, trainer, iteration, metrics, per_class) -> None:
        probe = next(iter(defined(metrics)), None)
        if "eval" not in self.logged_through and probe is not None:
            self.logged_through["eval"] = max((m.step for m in self.client.get_metric_history(self.run_id, probe)), default=-1)
        if iteration <= self.logged_through.get("eval", -1):
            return
        self.flush()
        self.buffer = [self._point(k, v, iteration) for k, v in defined(metrics).items()]
        self.flush(step_metrics=False)

    def after_train(self, trainer, result) -> None:
        self.flush(synchronous=True)


class GalleryHook(Hook):
    """Logs the prediction gallery (``eval.gallery`` fixed validation images, ``engine.gallery``) at every evaluation.

    Each panel goes to MLflow (through the run's journal) as ``log_image(key="gallery/<image id>", step=iteration)``, so the run
    page's image view steps through the evaluations and compares runs image by image; the last
    evaluation's panels are also stored as ``gallery/<image id>.png`` (what ``rcnn-lab report --gallery`` reads) and
    shown in the run's description (``tags.NOTE``, the run page MLflow opens on: one click from the run list).
    """

    def __init__(self, journal, count: int):
        self.journal, self.count = journal, count

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
        shown = []
        for index in gallery_indices(len(trainer.val_set), self.count, trainer.config.eval.max_images):
            image, target = trainer.val_set[index]
            image_id = int(target["image_id"])
            if image_id not in evaluated:
                continue
            panel = draw_panel(image, target, by_image.get(image_id, []), trainer.val_set.categories, step=int(iteration))
            self.journal.image(panel, key=f"gallery/{image_id}", step=int(iteration))
            if final:
                self.journal.image_file(panel, f"gallery/{image_id}.png")
                shown.append(image_id)
        if shown:
            self.journal.tags({tags.NOTE: gallery_note(self.journal.run_id, shown, int(iteration))})


def gallery_note(run_id: str, image_ids: list[int], step: int) -> str:
    """Markdown showing the artifacts ``gallery/<id>.png`` of run ``run_id`` (the MLflow UI's own artifact address)."""
    from urllib.parse import quote

    lines = [f"**Prediction gallery** at step {step} (the last evaluation): each panel is ground truth | prediction "
             "(score >= 0.5). Every evaluation's panels: the *Model metrics* tab's images, or the artifacts under `images/`.", ""]
    for image_id in image_ids:
        url = f"get-artifact?path={quote(f'gallery/{image_id}.png', safe='')}&run_uuid={run_id}"
        lines += [f"image {image_id}, step {step}:", "", f"![image {image_id}, step {step}]({url})", ""]
    return "\n".join(lines)
