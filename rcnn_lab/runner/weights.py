"""``run:<run_id>`` weights: a finished run of the tracking store -> its last checkpoint file.

The engine loads weights from names and files (``engine/weights.py``); a run id needs the store,
so it is resolved here, before any run of the invocation is created. A run's checkpoints live in
its output folder (``runner.plan.output_dir``: ``<root>/outputs/<experiment>/<variant>-s<seed>-<hash>``,
found again from the run's tags), else in its ``checkpoint`` artifact (``tracking.log_checkpoint``).
``rcnn-lab eval --run`` and ``rcnn-lab predict --run`` use :func:`checkpoint_of_run` too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine.weights import KEY, RUN_PREFIX, file_digest, is_run, run_id_of
from rcnn_lab.errors import ConfigError, Problem, excerpt
from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.names import slug

ARTIFACT = "checkpoint"  # the artifact folder of tracking.log_checkpoint (runner.artifacts.log_results)


def open_store(uri: str, key: str = KEY, file: str | None = None):
    """A client of the store that must hold the run (never creates a local store)."""
    if tr.local_store_missing(uri):
        raise ConfigError([Problem(key, f"no tracking store at {uri} to look the run up in; run the experiment "
                                        "that trained it first, or give its checkpoint file", file)])
    return tr.client(uri)


def find_run(c, run_id: str, key: str = KEY, file: str | None = None):
    """The MLflow run ``run_id`` of the store, a finished variant run; one-line errors otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        run = c.get_run(run_id)
    except MlflowException as exc:
        if tr.unreachable(exc):
            raise
        raise ConfigError([Problem(key, f"no run {excerpt(run_id)} in the tracking store {c.tracking_uri}; "
                                        "copy the id from `rcnn-lab report` or the MLflow UI", file)]) from None
    kind = run.data.tags.get(tags.KIND)
    if kind == tags.SWEEP:
        raise ConfigError([Problem(key, f"run {run_id} is the sweep (parent) run of an invocation; give one of its "
                                        "variant runs (rcnn-lab report lists them)", file)])
    if kind == tags.EVAL_RUN:
        evaluated = run.data.tags.get(tags.EVALUATED_RUN)
        raise ConfigError([Problem(key, f"run {run_id} is an evaluation (rcnn-lab eval), it has no checkpoint; give "
                                        + (f"the run it evaluated, {evaluated}" if evaluated else "the weights it evaluated"),
                                   file)])
    if kind != tags.VARIANT_RUN:
        raise ConfigError([Problem(key, f"run {run_id} was not trained by rcnn-lab run (no {tags.KIND} tag); "
                                        "give its checkpoint file instead", file)])
    if run.info.status != "FINISHED":
        raise ConfigError([Problem(key, f"run {run_id} is {run.info.status}, not finished; rerun `rcnn-lab run` to "
                                        "finish it, or give one of its checkpoint files", file)])
    return run


def output_folder(run, root: Path) -> Path:
    """Where ``runner.plan.output_dir`` put a variant run's outputs, from its tags and params."""
    t = run.data.tags
    return Path(root) / "outputs" / run.data.params.get("name", "") / slug(t.get(tags.VARIANT, ""), t.get(tags.SEED, ""),
                                                                            t.get(tags.CONFIG_HASH, ""))


def checkpoint_of_run(c, run_id: str, root: Path, key: str = KEY, file: str | None = None) -> Path:
    """The last checkpoint of the finished run ``run_id``: in its output folder under ``root``, else
    downloaded once from its ``checkpoint`` artifact (to ``<root>/downloads/<run_id>``)."""
    run = find_run(c, run_id, key, file)
    folder = ckpt.folder(output_folder(run, root))
    last = ckpt.latest(folder)
    if last is not None:
        return last
    logged = [a.path for a in c.list_artifacts(run_id, ARTIFACT) if ckpt.iteration_of(a.path) is not None]
    if logged:
        name = max(logged, key=ckpt.iteration_of)
        target = Path(root) / "downloads" / run_id
        local = target / name
        if not local.is_file():
            import mlflow.artifacts

            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(target),
                                                tracking_uri=c.tracking_uri)
        return local
    raise ConfigError([Problem(key, f"run {run_id} has no checkpoint: none in {folder} and no {ARTIFACT} artifact "
                                    "(its outputs were deleted or written under another RCNN_LAB_RUNS); give a "
                                    "checkpoint file instead", file)])


def run_identity(spec: str, uri: str | None, root: Path | None = None, key: str = KEY, file: str | None = None) -> str:
    """The identity of ``run:<id>`` weights in the config hash: the sha256 of its last checkpoint's content, as
    ``engine.weights.identity_of`` gives for that file (the same checkpoint by path or by run id: one run).
    The store at ``uri`` (the experiment's ``tracking.uri`` or the default) is looked up, never created."""
    uri = tr.resolve_uri(uri, root)
    c = open_store(uri, key, file)
    return file_digest(checkpoint_of_run(c, run_id_of(spec), Path(root) if root is not None else tr.runs_root(uri),
                                         key, file))


def resolve(spec: str, c, root: Path, key: str = KEY, file: str | None = None) -> str:
    """``spec`` as the engine loads it: ``run:<id>`` -> its last checkpoint's path; anything else unchanged."""
    return str(checkpoint_of_run(c, run_id_of(spec), root, key, file)) if is_run(spec) else spec


def resolve_inputs(exp, plan, inputs: dict, root: Path | None = None, c=None) -> dict:
    """``inputs`` (``engine.preflight.preflight``'s) with every ``run:<id>`` weights resolved to a file.

    All problems are raised together before any run exists (``ConfigError``, each naming the file
    that set ``model.weights``). Without a ``run:`` spec in the plan the store is not opened.
    """
    todo = [r for r in plan if r.hash in inputs and is_run(inputs[r.hash].weights)]
    if not todo:
        return inputs
    uri = tr.resolve_uri(exp.tracking.uri, root)
    root = Path(root) if root is not None else tr.runs_root(uri)
    out, problems, done = dict(inputs), [], {}
    for run in todo:
        spec, file = inputs[run.hash].weights, run.variant.source_of(KEY)
        try:
            if spec not in done:
                c = c if c is not None else open_store(uri, KEY, file)
                done[spec] = resolve(spec, c, root, KEY, file)
            out[run.hash] = replace(inputs[run.hash], weights=done[spec])
        except ConfigError as exc:
            problems += [p for p in exc.problems if str(p) not in map(str, problems)]
    if problems:
        raise ConfigError(problems)
    return out


__all__ = ["RUN_PREFIX", "checkpoint_of_run", "find_run", "open_store", "output_folder", "resolve", "resolve_inputs",
           "run_identity"]
