"""The Optuna side of a search: storage, sampler, pruner, the study, and its MLflow parent run."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path

from rcnn_lab.config.loader import Experiment
from rcnn_lab.config.search import SearchConfig
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr

JOURNAL = "journal:"  # search.storage: journal:PATH -> Optuna's JournalStorage on a (shared) file
PARENT_ATTR = "mlflow_parent_run"  # study user attr: the search's parent run in MLflow
SQLITE_TIMEOUT_S = 60  # several workers on one sqlite file wait for its lock this long


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)


def storage_url(search: SearchConfig, uri: str, root: Path | None = None) -> str:
    """``search.storage``, else ``sqlite:///<runs root>/optuna.db`` beside the MLflow store (``runs/optuna.db``)."""
    if search.storage:
        return search.storage
    folder = Path(root) if root is not None else tr.runs_root(uri)
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def storage(url: str):
    """An Optuna storage for ``url``: ``journal:PATH`` (JournalStorage, file backend) or an RDB URL."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {}
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        rdb = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:  # a driver missing, a server down, a bad URL
        raise ConfigError([Problem("search.storage", f"Optuna storage {url} cannot be opened "
                                   f"({str(exc).splitlines()[0][:200]}); fix the URL or use journal:PATH")]) from None
    if sqlite:
        _write_ahead(rdb.engine)
    return rdb


def _write_ahead(engine) -> None:
    """sqlite in WAL mode without an fsync per commit: a proposal writes ~15 small rows (each suggested value,
    the trial's attrs), which otherwise cost an fsync each (about 1 s per proposal on a busy disk). Commits
    survive a killed process (kill -9) as before; only a power cut may lose the last ones. Readers and one
    writer no longer block each other (parallel workers on one file)."""
    from sqlalchemy import event

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections made before the listener (table creation) are not reused


def study_name(exp: Experiment) -> str:
    """One study per experiment and search space + objective (budget, sampler and pruner may change on resume)."""
    return f"{exp.tracking_name}-search-{exp.search.fingerprint}"


def directions(search: SearchConfig) -> list[str]:
    return ["maximize" if d == "max" else "minimize" for d in search.objective.values()]


def grid_size(search: SearchConfig) -> int:
    return math.prod(len(p.grid()) for p in search.space)


def sampler(search: SearchConfig, number: int):
    """See :func:`_sampler`; Optuna's notes that multivariate TPE, QMC and the like are experimental are muted
    (they would print at every trial)."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return _sampler(search, number)


def _sampler(search: SearchConfig, number: int):
    """The sampler proposing trial ``number``, seeded with ``sampler.seed`` and the trial number: proposals are a
    function of the seed and the study's history, the same after a resume, and parallel workers (different
    trial numbers) never draw from the same random stream. QMC and grid keep one seed (it orders their points;
    the storage says which points are taken)."""
    from optuna import samplers

    from rcnn_lab.search.space import grid_values

    kind, seed = search.sampler.type, search.sampler.seed
    per_trial = (seed * 1_000_003 + number) % 2**32
    if kind == "tpe":
        return samplers.TPESampler(seed=per_trial, constant_liar=True, multivariate=True)
    if kind == "random":
        return samplers.RandomSampler(seed=per_trial)
    if kind == "grid":
        return _Grid({p.key: grid_values(p) for p in search.space}, seed=seed)  # the seed shuffles the grid: one order
    if kind == "qmc":
        return samplers.QMCSampler(seed=seed, scramble=True, warn_asynchronous_seeding=False,
                                   independent_sampler=samplers.RandomSampler(seed=per_trial))
    if kind == "nsga2":
        return samplers.NSGAIISampler(seed=per_trial, population_size=max(4, min(50, (search.budget.trials or 20) // 4)))
    raise ValueError(kind)  # the schema allows no other


def _grid_sampler():
    from optuna.samplers import GridSampler

    class Grid(GridSampler):
        """Optuna's grid sampler without its ``study.stop()`` at the grid's end (valid inside ``study.optimize`` only):
        the driver ends a grid search itself (``driver.limit``)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid


def _Grid(*args, **kwargs):  # noqa: N802  (a class, built on first use: Optuna is imported lazily)
    return _grid_sampler()(*args, **kwargs)


def pruner(search: SearchConfig):
    from optuna import pruners

    p = search.pruner
    if p.type == "asha":
        return pruners.SuccessiveHalvingPruner(min_resource=p.min_iterations, reduction_factor=p.reduction_factor)
    return pruners.NopPruner()


def open_study(exp: Experiment, url: str):
    """Create or load the experiment's study on ``url`` (safe when several workers start together)."""
    import optuna

    quiet_optuna()
    st = storage(url)
    return optuna.create_study(storage=st, study_name=study_name(exp), directions=directions(exp.search),
                               sampler=sampler(exp.search, 0), pruner=pruner(exp.search), load_if_exists=True)


def parent_run(c, exp_id: str, exp: Experiment, study, url: str, common: dict[str, str]) -> str:
    """The search's one parent run in MLflow (created by the first invocation, marked RUNNING again by later ones).

    Race-free: replacing the study's ``mlflow_parent_run`` attr (absent, or a run deleted from the store) is
    claimed by creating the Optuna study ``<study>:parent:<old value>`` in the same storage, whose study names
    are unique (a unique row in an RDB, the first record of the journal). The worker whose claim is created
    reads the attr again, creates the run, sets the attr and drops the claim; the others wait for the attr and
    adopt it. A claim whose process is gone (same host and dead pid, or held past ``CLAIM_WAIT_S``) is dropped."""
    from optuna.exceptions import DuplicatedStudyError
    from optuna.study import StudyDirection

    st = None
    seen: dict[str, float] = {}  # claim -> when this process first found it held
    while True:
        known = study.user_attrs.get(PARENT_ATTR)
        if known and _usable(c, known):
            return known
        st = st or storage(url)
        claim = f"{study.study_name}:parent:{known or 'none'}"
        try:
            claim_id = st.create_new_study([StudyDirection.MINIMIZE], study_name=claim)
        except DuplicatedStudyError:
            _drop_if_stale(st, claim, seen)
            time.sleep(0.2)
            continue
        try:
            st.set_study_user_attr(claim_id, "host", socket.gethostname())
            st.set_study_user_attr(claim_id, "pid", os.getpid())
            if study.user_attrs.get(PARENT_ATTR) != known:  # replaced between our read and our claim: adopt it
                continue
            run = c.create_run(exp_id, run_name=f"search {exp.name} {time.strftime('%Y-%m-%d %H:%M:%S')}", tags={
                **common, **tr.claim_tags(), tags.KIND: tags.SEARCH, tags.STUDY: study.study_name, tags.STORAGE: url})
            study.set_user_attr(PARENT_ATTR, run.info.run_id)
            return run.info.run_id
        finally:
            _drop(st, claim)


CLAIM_WAIT_S = 60  # a parent-run claim held longer than this (its process died mid-claim) is dropped


def _usable(c, run_id: str) -> bool:
    """The known parent run still exists (active): marked RUNNING again for this invocation."""
    try:
        run = c.get_run(run_id)
    except Exception:  # deleted from the store: a new one replaces it
        return False
    if run.info.lifecycle_stage != "active":
        return False
    if run.info.status != "RUNNING":
        c.update_run(run_id, status="RUNNING")
    return True


def _drop(st, claim: str) -> None:
    try:
        st.delete_study(st.get_study_id_from_name(claim))
    except KeyError:  # already dropped (by a worker that found it stale)
        pass


def _drop_if_stale(st, claim: str, seen: dict[str, float]) -> None:
    first = seen.setdefault(claim, time.time())
    try:
        attrs = st.get_study_user_attrs(st.get_study_id_from_name(claim))
    except KeyError:
        return
    host, pid = attrs.get("host"), attrs.get("pid")
    dead = False
    if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead = True
        except PermissionError:
            pass
    if dead or time.time() - first > CLAIM_WAIT_S:
        _drop(st, claim)
        seen.pop(claim, None)
