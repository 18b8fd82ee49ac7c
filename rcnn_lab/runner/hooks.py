"""Training hooks that log to MLflow: batched (and by default asynchronous) metric logging."""

from __future__ import annotations

import time

from rcnn_lab.engine.hooks import Hook, StepRecord
from rcnn_lab.runner.tracking import TAG


class MLflowHook(Hook):
    """Buffers per-step metrics and sends them with ``log_batch`` every ``every`` iterations."""

    def __init__(self, client, run_id: str, every: int, asynchronous: bool = True):
        self.client, self.run_id, self.every, self.asynchronous = client, run_id, max(1, every), asynchronous
        self.buffer: list = []

    def _metric(self, key: str, value: float, step: int):
        from mlflow.entities import Metric

        return Metric(key, float(value), int(time.time() * 1000), step)

    def flush(self, synchronous: bool = False) -> None:
        from mlflow.entities import RunTag

        if not self.buffer and not synchronous:
            return
        batch, self.buffer = self.buffer, []
        beat = [RunTag(f"{TAG}heartbeat", str(int(time.time())))]
        for i in range(0, max(len(batch), 1), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], tags=beat if i == 0 else (),
                                  synchronous=synchronous or not self.asynchronous)
        if synchronous and self.asynchronous:
            import mlflow

            mlflow.flush_async_logging()

    def after_step(self, trainer, record: StepRecord) -> None:
        step = record.iteration
        m = self._metric
        self.buffer += [m(k, v, step) for k, v in record.losses.items()]
        self.buffer += [
            m("loss", record.total, step), m("lr", record.lr, step), m("data_time_s", record.data_time, step),
            m("step_time_s", record.step_time, step), m("images_per_s", record.images / max(record.step_time, 1e-9), step),
            m("peak_memory_mb", record.peak_memory_mb, step),
        ]
        self.buffer += [m(k, v, step) for k, v in record.extra.items()]
        if step % self.every == 0:
            self.flush()

    def after_eval(self, trainer, iteration, metrics, per_class) -> None:
        self.buffer += [self._metric(k, v, iteration) for k, v in metrics.items()]
        self.flush()

    def after_checkpoint(self, trainer, iteration, path) -> None:
        self.flush(synchronous=True)  # metrics up to a checkpoint are durable before we rely on it

    def after_train(self, trainer, result) -> None:
        self.flush(synchronous=True)
