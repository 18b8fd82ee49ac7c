"""Shared fixtures. Tests run on CPU with tiny models and datasets."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_configure(config):
    """In each process that runs tests (not in pytest-xdist's controller, which only hands out files: torch and
    torchvision would cost it seconds of CPU while its workers start):

    * Intra-op threads: at most 2, and the cores shared among pytest-xdist's workers (make test runs 2): two
      spin-waiting OpenMP threads per worker on a busy 2-core machine made in-process training ~5x slower
      (docs/benchmarks/test_suite.md). Under xdist, the processes that tests start get the worker's share too.
    * Tests build parts straight from the registries (DATASETS.build, build_model), as the loader and the
      trainer do once they have registered the built-ins."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the controller
    import torch

    from rcnn_lab.components import register_builtins

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, (os.cpu_count() or 1) // workers))
    torch.set_num_threads(threads)
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    register_builtins()


def pytest_collection_modifyitems(config, items):
    """Files that hold a ``slow`` test run first (a stable sort: the order within and between files is kept
    otherwise). Under ``make test``'s two workers (``--dist loadfile --no-loadscope-reorder``), each worker takes
    the next file when it runs out: the long files start early and the many short ones fill in at the end
    (xdist's own order, files with the most tests first, leaves the end-to-end files for last). Measured on 2
    cores, the gain is within the run-to-run spread (docs/benchmarks/test_suite.md, "Third round")."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` of a process that a test interrupts as Ctrl-C would: SIGINT at its default action and not
    blocked, as a terminal's foreground process gets it. A child inherits an ignored or blocked SIGINT from the
    process that starts it, and the test process's own (a pytest-xdist worker's) is not always the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Every test gets its own empty on-disk cache (rcnn_lab.data.cache): none writes to the home folder."""
    monkeypatch.setenv("RCNN_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))


_SESSION_HANDLERS = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A sweep run in-process makes SIGINT/SIGTERM interrupt it (rcnn_lab.runner.parallel.join): put
    pytest's handlers back after each test. Those of the session's start, not of the test's: a module
    fixture that ran a sweep has already changed them by the time its first test starts."""
    yield
    for sig, handler in _SESSION_HANDLERS.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (for a process it starts in-process) leaves the next ones theirs:
    a float comparison between thread counts (test_distributed's ranks vs one process) depends on it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_yaml(tmp_path):
    """Write a YAML file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return _write


TINY_MODEL = """
model:
  num_classes: 6
  transform: {min_size: 64, max_size: 64}
  backbone: {type: resnet_fpn, depth: 18, returned_layers: [2, 3, 4], out_channels: 64}  # 45 % fewer FLOPs a step than 256
  anchor_generator: {type: grid, sizes: [[16], [32], [64], [128]], aspect_ratios: [[1.0]]}
  rpn:
    pre_nms_top_n: {train: 100, test: 50}
    post_nms_top_n: {train: 50, test: 25}
    batch_size_per_image: 64
  roi_heads:
    box_head: {type: two_mlp, representation_size: 64}
    mask_head: {type: conv_stack, layers: [32], dilation: 1}
    mask_predictor: {type: mask_rcnn, dim_reduced: 32}
    batch_size_per_image: 32
    detections_per_img: 20
"""


# overrides giving both poolers gradients w.r.t. boxes (needed by proposal_gradient: backprop)
DIFF_POOLERS = [
    "model.roi_heads.box_pooler={type: differentiable_roi_align, output_size: 7, sampling_ratio: 2}",
    "model.roi_heads.mask_pooler={type: differentiable_roi_align, output_size: 14, sampling_ratio: 2}",
]


# the tiny detach-vs-backprop experiment shared by the proposal-gradient and probe tests
DETACH_VS_BACKPROP = TINY_MODEL + """
data:
  train: {type: shapes, split: train, num_images: 4, image_size: 64, min_objects: 2}
  val: {type: shapes, split: val, num_images: 2, image_size: 64}
  batch_size: 2
train: {iterations: 2, lr_scheduler: {type: multistep, milestones: [0.75], warmup_iters: 0}}
variants:
  detach: {model.rpn.proposal_gradient: detach}
  backprop: {model.rpn.proposal_gradient: backprop}
"""


def detach_vs_backprop(folder: Path, name: str) -> tuple[dict, list, list]:
    """Load :data:`DETACH_VS_BACKPROP` with :data:`DIFF_POOLERS`: ``({variant: config}, 2 train images, their targets)``.

    32 FPN channels instead of 256: the same components and gradient paths, and each of the probe's
    five backward passes about half the cost."""
    from rcnn_lab.engine.preflight import load_experiment
    from rcnn_lab.registry import DATASETS

    path = folder / "exp.yaml"
    path.write_text(f"name: {name}\n" + DETACH_VS_BACKPROP)
    configs = {v.name: v.config for v in load_experiment(path, [*DIFF_POOLERS, "model.backbone.out_channels=32"]).variants}
    data = DATASETS.build(configs["detach"].data.train, "data.train")
    images, targets = zip(*(data[i] for i in range(2)))
    return configs, list(images), list(targets)


@pytest.fixture
def tiny_model_yaml() -> str:
    return TINY_MODEL


@pytest.fixture(scope="session")
def new_store(tmp_path_factory):
    """``new_store(folder, name="store/mlflow.db")`` -> sqlite URI of an empty MLflow store at ``folder/name``.

    MLflow builds a new database with dozens of migrations (seconds each time); tests copy one built here. A test
    whose subject is how a store comes to be (rcnn_lab.runner.tracking) lets MLflow build its own.
    """
    import shutil

    from mlflow import MlflowClient

    template = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()

    def _copy(folder: Path, name: str = "store/mlflow.db") -> str:
        db = folder / name
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
        return f"sqlite:///{db}"

    return _copy


@pytest.fixture(scope="session")
def warm(tmp_path_factory):
    """Starts ``python -m MODULE`` and ``python -c CODE`` processes forked from a server that has imported the
    package once per worker (tests/warm.py): for tests where the process boundary is the behaviour, without
    its imports."""
    from tests.warm import ColdServer, WarmServer

    server = WarmServer(tmp_path_factory.mktemp("warm")) if hasattr(os, "pidfd_open") else ColdServer()
    yield server
    server.stop()
