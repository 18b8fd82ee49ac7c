"""The search loop: reconcile what a killed invocation left, then ask -> reuse or train -> tell until the budget ends.

One truth per side: Optuna's storage holds the trials (params, state, values; ``config_hash`` and
``run_id`` as user attrs), MLflow the runs (each tagged with its trial number). A trial's config hash
is recorded before its run starts, so whatever is killed, the next invocation finds its run:

* a RUNNING trial whose process is gone (same host and dead pid, or older than the runner's stale
  claim limit elsewhere) is adopted: its run is resumed from its checkpoint (``run_plan`` decides
  RESUME for a KILLED run or a stale claim), or told if it FINISHED in the meantime;
* a proposed config whose run FINISHED (in this search or an ordinary sweep) is told without
  training; one a live worker trains is voided (FAIL, ``void`` attr) and not counted;
* a trial stopped by the pruner is told PRUNED with the iteration it reached (its run is KILLED with
  its checkpoint, so ``rcnn-lab run`` of that config resumes it).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from rcnn_lab.config.loader import Experiment
from rcnn_lab.engine.hooks import Hook, Priority, StopTraining
from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr
from rcnn_lab.runner.outcome import Status
from rcnn_lab.search import feasible, space
from rcnn_lab.search import study as st

VOID = "void"  # user attr of a trial that is not part of the search (duplicate of a running config, over budget)
WALL = "budget_wall:"  # study user attr per invocation: [start, last update] (epoch s) of its search loop
HOST, PID, HASH, RUN_ID, ITERATION, REUSED = "host", "pid", "config_hash", "run_id", "iteration", "reused_run"


@dataclass
class Search:
    """Everything one invocation of a search works with."""

    exp: Experiment
    study: object  # optuna.Study
    url: str
    client: object  # MlflowClient
    exp_id: str
    parent: str
    progress: bool = False
    echo: object = print
    root: Path | None = None
    told: list[int] = field(default_factory=list)  # trial numbers this invocation told
    train: object = None  # (trial number, PlannedRun) -> Outcome; None: in this process (``search.ddp``: on N ranks)


class PruneHook(Hook):
    """Reports the objective at each periodic evaluation to the trial; stops the run when the pruner says so."""

    priority = Priority.NORMAL

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def after_eval(self, trainer, iteration, metrics, per_class):
        if iteration >= trainer.periods.iterations or self.metric not in metrics:
            return  # the final evaluation is the trial's value, told by the driver
        self.trial.report(float(metrics[self.metric]), iteration)
        if self.trial.should_prune():
            if not trainer.periods.checkpoints_after(iteration):
                trainer.save_checkpoint(iteration)  # kept: a promotion (or `rcnn-lab run`) resumes from here
            raise StopTraining(iteration, "pruned")


def _alive(attrs: dict, started) -> bool:
    host, pid = attrs.get(HOST), attrs.get(PID)
    if host == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return started is not None and time.time() - started.timestamp() < tr.STALE_AFTER_S


def counted(trials) -> list:
    """Trials that take a place in the budget (not voided)."""
    return [t for t in trials if VOID not in t.user_attrs]


def _values(s: Search, metrics: dict) -> list[float] | None:
    names = list(s.exp.search.objective)
    if not all(n in metrics for n in names):
        return None
    return [float(metrics[n]) for n in names]


def _tag(s: Search, run_id: str | None, number: int, state: str) -> None:
    if run_id is None:
        return
    try:
        s.client.set_tag(run_id, tags.TRIAL_STATE, state)
        run = s.client.get_run(run_id)
        if tags.TRIAL not in run.data.tags:  # a reused run keeps the first trial that used it
            s.client.set_tag(run_id, tags.TRIAL, str(number))
    except Exception:  # the tag is a convenience; the trial's run_id attr is the link
        pass


def _tell(s: Search, trial, state: str, values=None, run_id: str | None = None, metrics: dict | None = None,
          **attrs) -> None:
    from optuna.trial import TrialState

    if metrics is not None and state == "complete":  # before tell: the sampler reads them when it is told
        feasible.record(s.exp.search, trial, metrics)
    for k, v in {RUN_ID: run_id, **attrs}.items():
        if v is not None:
            trial.set_user_attr(k, v)
    kind = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[state]
    s.study.tell(trial, values if state == "complete" else None, state=kind, skip_if_finished=True)
    s.told.append(trial.number)
    _tag(s, run_id, trial.number, state)
    shown = ", ".join(f"{n} {v:.4f}" for n, v in zip(s.exp.search.objective, values or []))
    s.echo(f"trial {trial.number}: {state}{' ' + shown if shown else ''}{f' (run {run_id})' if run_id else ''}")


def execute(s: Search, trial, values: dict, adopted: bool = False) -> None:
    """Reuse, or train (resuming where a run of the config was killed), then tell trial ``trial``.

    ``adopted``: a trial taken over from a dead process; when another worker resumes its run first,
    that worker tells it."""
    from rcnn_lab.runner.sweep import run_plan

    run = space.trial_run(s.exp, trial.number, values)
    trial.set_user_attr(HASH, run.hash)
    existing = tr.runs_with_hash(s.client, s.exp_id, run.hash)
    done = [r for r in existing if r.info.status == "FINISHED"]
    if done:
        final = tr.final_metrics(done[0])
        got = _values(s, final)
        if got is not None:
            reused = done[0].data.tags.get(tags.TRIAL) != str(trial.number)  # not its own run, finished before a kill
            _tell(s, trial, "complete", got, done[0].info.run_id, final,
                  **{REUSED: reused, ITERATION: run.config.train.iterations})
            return
    stopped = [r for r in existing if r.info.status == "KILLED" and tags.STOPPED_AT in r.data.tags]
    if stopped and stopped[0] is existing[0]:
        r = stopped[0]
        _tell(s, trial, "pruned", run_id=r.info.run_id, **{ITERATION: int(r.data.tags[tags.STOPPED_AT])})
        return
    if any(r.info.status == "RUNNING" and not tr.claim_is_stale(r) for r in existing):
        if not adopted:
            _void(s, trial, "duplicate of a config another worker is training")
        return
    search = s.exp.search
    hooks = None
    if search.pruner.type != "none":
        hooks = lambda r: [PruneHook(trial, next(iter(search.objective)))]  # noqa: E731
    child = trial_tags(s, trial.number)
    if s.train is not None:
        o = s.train(trial.number, run)
    else:
        o = run_plan(s.exp, [run], parent=s.parent, child_tags=child, hooks=hooks, progress=s.progress, echo=s.echo,
                     root=s.root)[0]
    if o.status in (Status.FINISHED, Status.SKIPPED):
        got = _values(s, o.metrics)
        if got is None:
            _tell(s, trial, "failed", run_id=o.run_id, error=f"the run logged none of {list(search.objective)}")
        else:
            _tell(s, trial, "complete", got, o.run_id, o.metrics, **{ITERATION: run.config.train.iterations})
    elif o.status == Status.STOPPED:
        run_tags = s.client.get_run(o.run_id).data.tags
        _tell(s, trial, "pruned", run_id=o.run_id, **{ITERATION: int(run_tags.get(tags.STOPPED_AT, 0))})
    elif o.status == Status.RUNNING_ELSEWHERE:
        if not adopted:
            _void(s, trial, "duplicate of a config another worker is training")
    else:
        _tell(s, trial, "failed", run_id=o.run_id, error=(o.error or str(o.status))[:500])


def trial_tags(s: Search, number: int) -> dict[str, str]:
    """The tags of trial ``number``'s run (its study, number and stage), whichever process trains it."""
    return {tags.STUDY: s.study.study_name, tags.TRIAL: str(number), tags.STAGE: "trial"}


def _void(s: Search, trial, why: str) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr(VOID, why)
    s.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    s.echo(f"trial {trial.number}: {why}; not counted")


def reconcile(s: Search) -> list:
    """RUNNING trials whose process is gone (after kill -9): adopted by this process; returns them (optuna.Trial)."""
    import optuna
    from optuna.trial import TrialState

    adopted = []
    for ft in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _alive(ft.user_attrs, ft.datetime_start):
            continue
        trial = optuna.trial.Trial(s.study, ft._trial_id)
        # claim it for this process: another worker reconciling at the same time sees a live owner next
        trial.set_user_attr(HOST, socket.gethostname())
        trial.set_user_attr(PID, os.getpid())
        s.echo(f"trial {ft.number}: its process is gone; resuming it here")
        adopted.append(trial)
    return adopted


def _ask(s: Search):
    """A new trial, proposed by a sampler seeded with the search seed and the trial's number."""
    n = len(s.study.get_trials(deepcopy=False))
    s.study.sampler = st.sampler(s.exp.search, n)
    trial = s.study.ask()
    if trial.number != n:  # another worker asked in between: reseed for the number we got (independent draws)
        s.study.sampler = st.sampler(s.exp.search, trial.number)
    trial.set_user_attr(HOST, socket.gethostname())
    trial.set_user_attr(PID, os.getpid())
    return trial


def limit(s: Search) -> int | None:
    """The number of trials the budget allows (a grid also ends when every point is done)."""
    search = s.exp.search
    caps = [n for n in (search.budget.trials, st.grid_size(search) if search.sampler.type == "grid" else None) if n]
    return min(caps) if caps else None


def spent_s(attrs: dict) -> float:
    """Seconds the search has run: the union of the invocations' ``budget_wall:*`` intervals (study user attrs),
    so resumes add up and workers running at the same time count once."""
    spans = sorted(tuple(v) for k, v in attrs.items() if k.startswith(WALL) and isinstance(v, list) and len(v) == 2)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _clock(s: Search):
    """Records this invocation's interval in the study (``budget_wall:<host>:<pid>:<start>``); the returned function
    updates it and says whether ``budget.hours`` is spent, across every invocation of the search."""
    began = time.time()
    key = f"{WALL}{socket.gethostname()}:{os.getpid()}:{int(began * 1000)}"
    hours = s.exp.search.budget.hours

    def spent() -> bool:
        s.study.set_user_attr(key, [began, time.time()])
        if not hours:
            return False
        used = spent_s(s.study.user_attrs)
        if used >= hours * 3600:
            s.echo(f"search: budget.hours spent ({used / 3600:.3g} h of {hours:g} h, all invocations together)")
            return True
        return False

    return spent


def run_search(s: Search) -> list[int]:
    """Adopt orphaned trials, then run new ones until the budget ends; returns the trial numbers told here."""
    search = s.exp.search
    spent = _clock(s)
    for trial in reconcile(s):
        execute(s, trial, space.suggest(trial, search.space), adopted=True)
    voids = 0
    cap = limit(s)
    while not spent():
        if cap is not None and len(counted(s.study.get_trials(deepcopy=False))) >= cap:
            break
        trial = _ask(s)
        ahead = [t for t in counted(s.study.get_trials(deepcopy=False)) if t.number < trial.number]
        if cap is not None and len(ahead) >= cap:  # workers asked together past the budget: the later ones drop out
            _void(s, trial, "over budget")
            break
        before = len(s.told)
        execute(s, trial, space.suggest(trial, search.space))
        voids = voids + 1 if len(s.told) == before else 0
        if voids >= 20:
            s.echo("search: 20 proposals in a row duplicated running configs; the space looks exhausted")
            break
    spent()  # the interval up to now, whatever ended the loop
    return list(s.told)


def wait_for_running(s: Search, poll_s: float = 5.0) -> None:
    """Until no trial of the study is RUNNING with a live owner (other workers finishing their trials)."""
    from optuna.trial import TrialState

    while any(_alive(t.user_attrs, t.datetime_start)
              for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        time.sleep(poll_s)
