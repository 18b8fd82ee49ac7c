"""Hyperparameter search (``search:`` in an experiment; ``rcnn-lab search``), a layer above the runner.

Optuna proposes trials through its ask/tell interface and its storage coordinates them (sqlite beside
the MLflow store by default, any RDB URL, or a JournalStorage file); each trial is an ordinary rcnn-lab
run (``runner.sweep.run_plan``) nested under the search's parent run in MLflow. The runner knows nothing
of this layer: it is handed a parent run, tags and hooks.

* ``study``: storage, samplers (seeded per trial number), pruner, the study and its parent run.
* ``space``: a trial's parameters <-> its config, variant and planned run.
* ``driver``: the loop (budget, ask, reuse by config hash, train, tell) and reconciliation after a kill.
* ``confirm``: top-k re-run on ``confirm.seeds`` with the baseline, and ``--export``.
"""
