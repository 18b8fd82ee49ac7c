"""Fetch rcnn-lab runs from MLflow (``mlflow.search_runs``) as one pandas row per child run."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union

import pandas as pd

from rcnn_lab.config.schema import RunConfig
from rcnn_lab.errors import ConfigError, Problem, did_you_mean
from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr

PathOrName = Union[str, "os.PathLike[str]"]

# Columns every ``runs()`` frame starts with, in this order.
RUN_COLUMNS = [
    "experiment", "run_id", "parent_run_id", "variant", "seed", "config_hash", "baseline", "status",
    "start_time", "end_time", "changed", "overrides", "device", "threads", "error", "kind", "weights",
]
# Leaf config keys without a dot (``name``, ``description``, ``plugins``); every other param key is dotted.
_TOP_LEVEL_KEYS = frozenset(f.name for f in fields(RunConfig))
_KEY_COLUMNS = ["experiment", "variant", "seed"]


@dataclass(frozen=True)
class Source:
    """One experiment to report on: its MLflow name, store, and what the user typed."""

    name: str
    uri: str
    given: str
    file: str | None = None


def resolve_sources(experiments: PathOrName | Sequence[PathOrName], tracking_uri: str | None = None) -> list[Source]:
    """Experiment YAML paths or MLflow experiment names -> (name, store) pairs.

    A YAML file gives the name (``tracking.experiment`` or ``name``) and the store (``tracking.uri``);
    ``tracking_uri`` overrides the store for every item.
    """
    from rcnn_lab.engine.preflight import load_names

    items = [experiments] if isinstance(experiments, (str, os.PathLike)) else list(experiments)
    if not items:
        raise ConfigError([Problem("EXPERIMENT", "name at least one experiment YAML file or MLflow experiment name")])
    out: list[Source] = []
    for item in items:
        text = os.fspath(item)
        if text.endswith((".yaml", ".yml")) or Path(text).is_file():
            exp = load_names(text)
            out.append(Source(exp.tracking_name, tr.resolve_uri(tracking_uri or exp.tracking.uri), text, text))
        else:
            out.append(Source(text, tr.resolve_uri(tracking_uri), text))
    return out


@contextmanager
def _using_uri(uri: str) -> Iterator[None]:
    """Point the ``mlflow`` fluent API (``mlflow.search_runs``) at ``uri`` for the duration of the block."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # older/newer MLflow: set and restore by hand
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)
        return
    with _use_tracking_uri(uri):
        yield


def _experiment_id(client, source: Source) -> str:
    exp = client.get_experiment_by_name(source.name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = [e.name for e in client.search_experiments()]
        hint = did_you_mean(source.name, names) or (f" (experiments: {', '.join(sorted(names)[:10])})" if names else "")
        raise ConfigError([Problem(
            "EXPERIMENT", f"no MLflow experiment {source.name!r} in {source.uri}{hint}; run `rcnn-lab run EXP.yaml` "
            "first or pass --uri", source.file,
        )])
    return exp.experiment_id


def _decode(text: Any) -> Any:
    """A param value as logged by the runner: JSON text for non-strings, plain text for strings."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _frame(raw: pd.DataFrame, name: str) -> pd.DataFrame:
    """``mlflow.search_runs`` output -> rcnn-lab columns (tags decoded, ``final/*`` unprefixed, params decoded)."""
    def tag(key: str) -> pd.Series:
        col = f"tags.{key}"
        return raw[col] if col in raw.columns else pd.Series([None] * len(raw), index=raw.index, dtype=object)

    out = pd.DataFrame({
        "experiment": name,
        "run_id": raw["run_id"],
        "parent_run_id": tag(tags.SWEEP_RUN).fillna(tag(tags.PARENT)),  # runs logged before the flat layout: nested
        "variant": tag(tags.VARIANT),
        "seed": pd.to_numeric(tag(tags.SEED), errors="coerce").astype("Int64"),
        "config_hash": tag(tags.CONFIG_HASH),
        "baseline": tag(tags.BASELINE).eq("true"),
        "status": raw["status"],
        "start_time": raw["start_time"],
        "end_time": raw["end_time"],
        "changed": [json.loads(t) if isinstance(t, str) and t.startswith("{") else {} for t in tag(tags.CHANGED)],
        "overrides": [json.loads(t) if isinstance(t, str) and t.startswith("{") else {} for t in tag(tags.OVERRIDES)],
        "device": tag(tags.DEVICE),
        "threads": pd.to_numeric(tag(tags.THREADS), errors="coerce").astype("Int64"),
        "error": tag(tags.ERROR),
        "kind": tag(tags.KIND),
        "weights": tag(tags.WEIGHTS_SOURCE),
    }, index=raw.index)
    evals = out["kind"] == tags.EVAL_RUN
    if evals.any():  # an evaluation is a row of its own: "b (eval run 1a2b3c4d)", never the trained baseline
        out.loc[evals, "variant"] = [eval_label(v, w) for v, w in zip(out.loc[evals, "variant"], out.loc[evals, "weights"])]
        if (~evals).any():
            out.loc[evals, "baseline"] = False
    extra: dict[str, pd.Series] = {}
    final = f"metrics.{tags.FINAL_PREFIX}"
    for col in sorted(c for c in raw.columns if c.startswith(final)):
        extra[col[len(final):]] = raw[col].astype(float)
    for col in sorted(c for c in raw.columns if c.startswith("params.") and not tags.is_bookkeeping_param(c[len("params."):])):
        key = col[len("params."):]  # config keys only: rcnn_lab.* params are claim bookkeeping (runner.claims)
        extra[col if key in RUN_COLUMNS or key in extra else key] = raw[col].map(_decode)
    return pd.concat([out, pd.DataFrame(extra, index=raw.index)], axis=1).reset_index(drop=True)


def eval_label(variant: str, weights: str | None) -> str:
    """The row label of an evaluation (``rcnn-lab eval``) of ``variant`` with ``weights`` (``tags.WEIGHTS_SOURCE``)."""
    return f"{variant} (eval {weights or '?'})"


def runs(experiments: PathOrName | Sequence[PathOrName], tracking_uri: str | None = None,
         include_unfinished: bool = True) -> pd.DataFrame:
    """One row per child (variant x seed) run and per evaluation (``rcnn-lab eval``) of the given experiments,
    newest first per experiment. An evaluation's ``variant`` is :func:`eval_label` (``b (eval run 1a2b3c4d)``),
    so tables put it on a row of its own; ``kind`` is ``variant`` or ``eval``, ``weights`` what it evaluated.

    Columns: ``RUN_COLUMNS`` (``seed`` as nullable int, ``baseline`` as bool, ``changed`` as a dict of
    dotted keys -> values, ``overrides`` the part of ``changed`` set on the command line), every ``final/<name>`` metric as ``<name>``, and every param under its dotted
    config key with its logged value decoded (``"2000"`` -> ``2000``). ``df.attrs["tracking_uris"]`` maps
    each experiment name to its store. Raises ``ConfigError`` for a missing store or unknown experiment.
    """
    import mlflow

    sources = resolve_sources(experiments, tracking_uri)
    frames: list[pd.DataFrame] = []
    uris: dict[str, str] = {}
    for uri in dict.fromkeys(s.uri for s in sources):
        here = [s for s in sources if s.uri == uri]
        if tr.local_store_missing(uri):
            raise ConfigError([Problem(
                "--uri", f"no tracking store at {uri}; run `rcnn-lab run EXP.yaml` first or pass --uri", here[0].file,
            )])
        client = tr.client(uri)
        for source in here:
            exp_id = _experiment_id(client, source)
            uris[source.name] = uri
            with _using_uri(uri):
                found = [mlflow.search_runs(
                    experiment_ids=[exp_id], filter_string=tags.filter_equals(tags.KIND, kind),
                    order_by=["attributes.start_time DESC"], output_format="pandas",
                ) for kind in (tags.VARIANT_RUN, tags.EVAL_RUN)]
            found = [f for f in found if len(f)]
            raw = pd.concat(found, ignore_index=True).sort_values("start_time", ascending=False, kind="stable") \
                if len(found) > 1 else (found[0] if found else pd.DataFrame())
            if len(raw):
                frames.append(_frame(raw, source.name))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_COLUMNS)
    if not include_unfinished:
        df = df[df["status"] == "FINISHED"].reset_index(drop=True)
    df.attrs["tracking_uris"] = uris
    return df


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Names of the metric columns of a ``runs()`` frame: ``final/*`` metrics, and the ``NAME@N`` training-metric
    means ``report.steps.add_step_means`` adds (params are dotted or top-level config keys)."""
    return [
        c for c in df.columns
        if c not in RUN_COLUMNS and ("@" in c or ("." not in c and c not in _TOP_LEVEL_KEYS))
        and pd.api.types.is_numeric_dtype(df[c])
    ]


def latest_finished(df: pd.DataFrame) -> pd.DataFrame:
    """The newest FINISHED run per (experiment, variant, seed); older ones are dropped.

    Older means a rerun (``--force``) or a run of an earlier config of that variant (edited YAML,
    other ``--set``): averaging those in would mix two experiments, so the newest one stands.
    """
    done = df[df["status"] == "FINISHED"]
    done = done.sort_values("start_time", ascending=False, kind="stable")
    return done.drop_duplicates(_KEY_COLUMNS, keep="first").sort_values("start_time", kind="stable")


def run_uri(df: pd.DataFrame, experiment: str, tracking_uri: str | None = None) -> str:
    """The tracking store of ``experiment`` in a ``runs()`` frame."""
    return tracking_uri or df.attrs.get("tracking_uris", {}).get(experiment) or tr.resolve_uri(None)


def fetch_artifacts(df: pd.DataFrame, path: str, dst: str | os.PathLike[str],
                    tracking_uri: str | None = None) -> dict[str, Path]:
    """Download artifact ``path`` (a file or folder) of every run in ``df`` under ``dst/<run_id>/``.

    Returns ``{run_id: local path}`` for the runs that have it; runs without it are left out.
    """
    from mlflow import MlflowClient

    tr.quiet_mlflow()
    out: dict[str, Path] = {}
    clients: dict[str, Any] = {}
    for _, row in df.iterrows():
        uri = run_uri(df, row["experiment"], tracking_uri)
        client = clients.setdefault(uri, MlflowClient(tracking_uri=uri))
        parent, _, name = path.rstrip("/").rpartition("/")
        if not any(f.path.rstrip("/").rsplit("/", 1)[-1] == name for f in client.list_artifacts(row["run_id"], parent or None)):
            continue
        folder = Path(dst) / row["run_id"]
        folder.mkdir(parents=True, exist_ok=True)
        out[row["run_id"]] = Path(client.download_artifacts(row["run_id"], path, str(folder)))
    return out
