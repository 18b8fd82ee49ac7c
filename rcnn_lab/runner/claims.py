"""Claims: two workers sharing one tracking store never train the same config hash at once.

Workers (``--shard`` array jobs, ``--parallel`` processes, a second ``rcnn-lab run`` started by
hand) coordinate through MLflow alone:

* A **fresh run**: the worker creates its child run RUNNING with claim tags (host, pid, heartbeat;
  ``tracking.claim_tags``), then re-reads the runs of that hash (:func:`rival`). It backs off
  (deletes its run, reports RUNNING-ELSEWHERE) when a FINISHED run exists or another *live*
  RUNNING claim is older: earliest ``start_time``, ties broken by ``run_id``. Both racers read
  the same runs after both were created, so they agree on the owner; a racer that read before
  the other created its run is the older one, which the other defers to.
* A **takeover** (resuming a KILLED run, or a RUNNING one whose claim is stale: same host and
  dead pid, or heartbeat older than ``tracking.STALE_AFTER_S``): the worker logs a param named
  after the claim it saw (:func:`take_over`). MLflow refuses to change a logged param, so of
  the workers that saw the same claim exactly one succeeds; the others back off. The winner then
  marks the run RUNNING with its own claim tags and resumes into it.

The ordering of fresh claims uses the clients' clocks (``start_time``): exact on one host,
and across hosts as long as clocks agree to well within the time between creating a run and
reading it back (NTP). Takeovers do not depend on clocks.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

from rcnn_lab.runner import tags
from rcnn_lab.runner import tracking as tr


def _order(run) -> tuple[int, str]:
    return int(run.info.start_time or 0), run.info.run_id


def rival(c, exp_id: str, config_hash: str, run_id: str, finished_wins: bool = True):
    """The run that owns ``config_hash`` instead of our new run ``run_id``, or None when ours does.

    Call right after creating ``run_id`` (RUNNING, with this process's claim tags). A FINISHED
    run of the hash wins unless ``finished_wins`` is False (``--force`` reruns finished configs).
    """
    runs = tr.runs_with_hash(c, exp_id, config_hash)
    finished = [r for r in runs if r.info.status == "FINISHED" and r.info.run_id != run_id]
    if finished and finished_wins:
        return finished[0]
    live = [r for r in runs if r.info.status == "RUNNING" and (r.info.run_id == run_id or not tr.claim_is_stale(r))]
    if not live:
        return None
    owner = min(live, key=_order)
    return None if owner.info.run_id == run_id else owner


def claim_key(run) -> str:
    """Param key naming the claim of ``run`` as observed: its run id and claim tags (host, pid, heartbeat).

    Not the status: a winner sets RUNNING before its own claim tags, and a worker that reads the
    run in between must still compete for (and lose) the same key.
    """
    observed = run.data.tags
    seen = "|".join([run.info.run_id] + [observed.get(k, "") for k in (tags.HOST, tags.PID, tags.HEARTBEAT)])
    return tags.TAKEOVER_PREFIX + hashlib.sha1(seen.encode()).hexdigest()[:12]


def take_over(c, run) -> bool:
    """Claim the unfinished ``run`` (as ``decide`` saw it) for this process; False if another worker did.

    On success the run is RUNNING with this process's claim tags.
    """
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    try:
        c.log_param(run.info.run_id, claim_key(run), token)
    except MlflowException:  # "Changing param values is not allowed": someone took this claim first
        return False
    c.update_run(run.info.run_id, status="RUNNING")
    c.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tr.claim_tags().items()])
    return True


def back_off(c, run_id: str, rival) -> None:
    """Withdraw our new run ``run_id`` in favour of ``rival``: ended (KILLED, naming the rival), then deleted.

    Ended first because MLflow cannot change a deleted run: deleting alone would leave a RUNNING
    ghost in the store's deleted runs. A live or finished rival keeps ``decide`` from resuming it.
    """
    c.set_tag(run_id, tags.BACKED_OFF_TO, rival.info.run_id)
    c.set_terminated(run_id, "KILLED")
    c.delete_run(run_id)


def end_stale_sweeps(c, exp_id: str, plan_key: str | None = None) -> tuple[list[str], object | None]:
    """Mark KILLED the sweep (parent) runs left RUNNING by an invocation that is gone; -> (their ids, the run to continue).

    A sweep run carries claim tags and a heartbeat like its children; one whose claim is stale
    (:func:`tracking.claim_is_stale`) has no process left to end it. The newest stale one of the same
    plan (``plan_key``: the same command run again, e.g. after a tracking outage or ``kill -9`` left it
    RUNNING) is not ended but returned, claimed for this process (:func:`take_over`), so the rerun
    continues that sweep run; so is the plan's newest sweep run when it is KILLED (Ctrl-C, SIGTERM), as
    its runs resume. Sweep runs from before claim tags existed are left alone.
    """
    running = f"{tags.filter_equals(tags.KIND, tags.SWEEP)} and attributes.status = 'RUNNING'"
    runs = c.search_runs([exp_id], filter_string=running, order_by=["attributes.start_time DESC"])
    ended, kept = [], None
    for r in runs:
        if tags.PID in r.data.tags and tr.claim_is_stale(r):
            if kept is None and plan_key is not None and r.data.tags.get(tags.PLAN_KEY) == plan_key and take_over(c, r):
                kept = r
                continue
            c.set_terminated(r.info.run_id, "KILLED")
            ended.append(r.info.run_id)
    if kept is None and plan_key is not None:
        same = f"{tags.filter_equals(tags.KIND, tags.SWEEP)} and {tags.filter_equals(tags.PLAN_KEY, plan_key)}"
        newest = c.search_runs([exp_id], filter_string=same, order_by=["attributes.start_time DESC"], max_results=1)
        if newest and newest[0].info.status == "KILLED" and take_over(c, newest[0]):
            kept = newest[0]
    return ended, kept
