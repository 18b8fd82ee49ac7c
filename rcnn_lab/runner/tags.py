"""Every MLflow name rcnn-lab writes and reads: tags, param prefixes, metric prefixes, run kinds.

The runner writes runs with these names and the reports read them back; both import them from
here, so a name is typed once. Everything rcnn-lab tags starts with :data:`PREFIX`.
"""

from __future__ import annotations

PREFIX = "rcnn_lab."

# What a run is (tag KIND): the parent run of one invocation, one variant x seed child run, or an evaluation
# of given weights (``rcnn-lab eval``: no parent; the variant, seed and config tags of a child run, and the
# weights' identity in WEIGHTS_IDENTITY; CONFIG_HASH is the eval hash: the config's and the weights').
KIND = f"{PREFIX}kind"
SWEEP = "sweep"
VARIANT_RUN = "variant"
EVAL_RUN = "eval"
WEIGHTS_SOURCE = f"{PREFIX}weights_source"  # eval runs: the evaluated weights, short (a name, a file name, "run 1a2b3c4d")
EVALUATED_RUN = f"{PREFIX}evaluated_run"  # eval runs of --run: the run whose last checkpoint was evaluated

# Parent (sweep) runs; they carry the claim tags (HOST, PID, HEARTBEAT) too.
PLAN_SIZE = f"{PREFIX}plan_size"
PLAN_KEY = f"{PREFIX}plan_key"  # the same command's plan has the same key: its rerun continues the sweep run
NOTE = "mlflow.note.content"  # MLflow's run description (markdown, shown on the run page): the sweep's summary table

# Every run of an invocation (the ``common`` tags).
EXPERIMENT_FILE = f"{PREFIX}experiment_file"
WORLD_SIZE = f"{PREFIX}world_size"
GIT_COMMIT = f"{PREFIX}git_commit"
GIT_DIRTY = f"{PREFIX}git_dirty"
VERSION = f"{PREFIX}version"
TORCH = f"{PREFIX}torch"
TORCHVISION = f"{PREFIX}torchvision"

# Child (variant x seed) runs.
SWEEP_RUN = f"{PREFIX}sweep"  # the sweep run of the invocation that created it: runs are grouped by it, not nested
PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag: only when a caller nests runs under its own (a search study)
VARIANT = f"{PREFIX}variant"
SEED = f"{PREFIX}seed"
CONFIG_HASH = f"{PREFIX}config_hash"
WEIGHTS = f"{PREFIX}weights"  # model.weights: the load summary ("loaded 301 of 307 tensors; kept fresh: ...")
WEIGHTS_IDENTITY = f"{PREFIX}weights_identity"  # model.weights: the torchvision name, run:<id> or sha256 of the file
BASELINE = f"{PREFIX}baseline"
DEVICE = f"{PREFIX}device"
DEVICE_NAME = f"{PREFIX}device_name"
THREADS = f"{PREFIX}threads"  # torch's intra-op CPU threads: CPU results depend on it (reduction order)
CHANGED = f"{PREFIX}changed"  # JSON {dotted.key: value} of what the variant changes
OVERRIDES = f"{PREFIX}overrides"  # JSON: the part of CHANGED set on the command line (--set, --device)
ERROR = f"{PREFIX}error"  # first line of the exception of a FAILED run
BACKED_OFF_TO = f"{PREFIX}backed_off_to"  # a deleted run whose worker deferred to this run's claim
STOPPED_AT = f"{PREFIX}stopped_at"  # a run a hook ended early (KILLED, resumable): the iteration it reached
STOP_REASON = f"{PREFIX}stop_reason"  # ... and why (e.g. "pruned")

# Searches (``rcnn_lab.search``): one parent run per search (KIND = SEARCH); its trials' runs nest under it.
SEARCH = "search"
STUDY = f"{PREFIX}study"  # the Optuna study name (parent and trial runs)
STORAGE = f"{PREFIX}study_storage"  # where the study lives (parent run)
TRIAL = f"{PREFIX}trial"  # a trial's run: its Optuna trial number
TRIAL_STATE = f"{PREFIX}trial_state"  # complete | pruned | failed | running
STAGE = f"{PREFIX}search_stage"  # trial | confirm | baseline

# Experiments: MLflow 3 opens an experiment with this tag on its "Model training" view (runs, metrics, images), not on
# GenAI traces; MLflow >= 3.10's UI decides by its GenAI / Model training switch instead, which UI_WORKFLOW (a query of
# the UI's address) sets.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
UI_WORKFLOW = "workflowType=machine_learning"

# Run inputs (``runner.inputs``): MLflow's context tag of a logged dataset.
DATASET_CONTEXT = "mlflow.data.context"

# Claims (``runner.claims``): who trains a run, and whether that worker is alive.
HOST = f"{PREFIX}host"
PID = f"{PREFIX}pid"
HEARTBEAT = f"{PREFIX}heartbeat"
TAKEOVER_PREFIX = f"{PREFIX}takeover."  # params: one per claim taken over

# Params: the resolved config under its dotted keys; params starting with PREFIX are bookkeeping.
# Metrics: per-step names as logged, and the final evaluation under FINAL_PREFIX.
FINAL_PREFIX = "final/"


def is_bookkeeping_param(key: str) -> bool:
    """True for params rcnn-lab logs for itself (claims), not config keys."""
    return key.startswith(PREFIX)


def filter_equals(tag: str, value: str) -> str:
    """An MLflow ``search_runs`` filter on one tag's value."""
    return f"tags.`{tag}` = '{value}'"
