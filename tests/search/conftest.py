"""Search tests: the runner tests' tiny experiment (tests/runner/conftest.py) with a search: section."""

from __future__ import annotations

from pathlib import Path

from tests.runner.conftest import _isolated, _one_thread, cli, tiny_experiment  # noqa: F401  (fixtures)

SPACE = """search:
  space:
    train.optimizer.lr: {float: [0.001, 0.02], log: true}
    model.roi_heads.box_head: {choice: [{type: two_mlp, representation_size: 32}, {type: two_mlp, representation_size: 64}]}
  objective: {segm_AP50: max}
"""


def search_experiment(folder: Path, search: str = "", *, iterations: int = 2, train: str = "",
                      budget: str = "  budget: {trials: 2}\n", space: str = SPACE, pausable: bool = False) -> Path:
    """``folder/exp.yaml``: the tiny experiment tracked at ``folder/store/mlflow.db`` (Optuna's sqlite beside it)
    with ``space`` + ``budget`` + ``search`` (more search keys) appended."""
    path = tiny_experiment(folder, f"sqlite:///{folder / 'store' / 'mlflow.db'}", variants="  default: {}\n",
                           iterations=iterations, train=train, pausable=pausable)
    path.write_text(path.read_text() + space + budget + search)
    return path
