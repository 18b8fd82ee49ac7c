"""Runner tests: a tiny experiment (resnet18-FPN at 64 px, 8 train / 4 val shapes images) on a real MLflow store."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from tests.conftest import EXPERIMENTS, ROOT, TINY_MODEL

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PAUSE_PLUGIN = ROOT / "tests" / "fixtures" / "plugins" / "pause.py"
PAUSE_VAR = "RCNN_LAB_TEST_PAUSE_AFTER_IMAGES"
PAUSE_TRANSFORM = f"{{type: pause_at, env: {PAUSE_VAR}}}"  # pause.py's transform, reading PAUSE_VAR


def paused_env(env: dict[str, str], iteration: int, batch_size: int = 2) -> dict[str, str]:
    """``env`` for a process that runs a ``pausable`` tiny experiment and stops (until a signal) once ``iteration``
    iterations and their checkpoint are done."""
    return {**env, PAUSE_VAR: str(iteration * batch_size)}


def tiny_experiment(folder: Path, uri: str | None, *, variants: str = "  b: {}\n", iterations: int = 2,
                    train: str = "", name: str = "tiny", pausable: bool = False) -> Path:
    """Write ``folder/exp.yaml``: a tiny CPU experiment tracked at ``uri`` (None: the default store).

    ``pausable``: with the ``pause_at`` transform of tests/fixtures/plugins/pause.py, so that a test can stop the
    run at a known iteration (:func:`paused_env`)."""
    folder.mkdir(parents=True, exist_ok=True)
    tracking = f"tracking: {{uri: '{uri}'}}\n" if uri else ""
    train_block = train if "checkpoint_every" in train else "  checkpoint_every: 0\n" + train  # no duplicate key
    plugins = f"plugins: ['{PAUSE_PLUGIN}']\n" if pausable else ""
    transforms = f"[{{type: hflip, p: 0.5}}, {PAUSE_TRANSFORM}]" if pausable else "[{type: hflip, p: 0.5}]"
    text = f"""base: {EXPERIMENTS / 'base.yaml'}
{plugins}name: {name}
seeds: [0]
{TINY_MODEL}
data:
  train: {{type: shapes, split: train, num_images: 8, image_size: 64}}
  val: {{type: shapes, split: val, num_images: 4, image_size: 64}}
  batch_size: 2
  transforms: {transforms}
train:
  iterations: {iterations}
  device: cpu
  optimizer: {{type: sgd, lr: 0.01, momentum: 0.9}}
  lr_scheduler: {{type: multistep, milestones: [0.75], warmup_iters: 1}}
  log_every: 1
{train_block}{tracking}variants:
{variants}"""
    path = folder / "exp.yaml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def in_folder(root: Path):
    """Inside ``root`` as a module fixture's working folder, with no store or runs folder named by the environment
    (what a user gets in a fresh project folder); put back on exit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RCNN_LAB_RUNS", raising=False)
        yield mp


def cli_fd(capfd, *argv: str) -> tuple[int, str, str]:
    """``rcnn-lab ARGV`` in this process -> (exit code, stdout, stderr), read from the file descriptors (pytest's
    ``capfd``): the processes it starts (ranks, workers) write there, not to ``sys.stdout``."""
    from rcnn_lab.cli.main import main

    capfd.readouterr()
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def cli(*argv: str) -> tuple[int, str, str]:
    """``rcnn-lab ARGV`` in this process -> (exit code, stdout, stderr)."""
    from rcnn_lab.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Train on one intra-op thread: with other processes on the cores, two spin-waiting OpenMP threads
    make a step ~10x slower. Subprocesses get the same count (OMP_NUM_THREADS) so results stay comparable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Nothing a test runs may fall back to the repository's runs/ or an MLflow store from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RCNN_LAB_RUNS", raising=False)
