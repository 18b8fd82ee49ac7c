"""After the budget: the top-k trials re-run on ``confirm.seeds`` next to the baseline, and ``--export``.

A single seed flatters the trial that drew a lucky one (the winner's curse), so the search's result is
the ranking confirmed over several seeds against the baseline (the experiment without the searched
keys), compared by the report's paired statistics (``report.search``). Runs are ordinary runs: a
trial's own seed is reused by config hash, and a confirmation that was killed resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from rcnn_lab.config.loader import Experiment, Variant
from rcnn_lab.errors import ConfigError, Problem, display_path
from rcnn_lab.runner import tags
from rcnn_lab.runner.plan import PlannedRun
from rcnn_lab.search import feasible, space


@dataclass(frozen=True)
class Candidate:
    """A configuration of the confirmation stage: a top trial, or the baseline (``number`` None)."""

    number: int | None
    values: dict  # searched key -> value ({} for the baseline)
    variant: Variant
    single: tuple[float, ...] = ()  # the trial's objective values on its one seed

    @property
    def label(self) -> str:
        return self.variant.name


def finished_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def ranked(exp: Experiment, study) -> list:
    """Completed trials, best first (``feasible.ranked``: feasible first, the Pareto front first, then the first objective)."""
    return feasible.ranked(exp.search, finished_trials(study))


def candidates(exp: Experiment, study) -> list[Candidate]:
    """The baseline, then the top ``confirm.top_k`` trials."""
    top = ranked(exp, study)[:exp.search.confirm.top_k]
    out = [Candidate(None, {}, exp.baseline)]
    for t in top:
        values = space.stored(exp.search.space, t.params)
        out.append(Candidate(t.number, values, space.configure(exp.baseline, values, space.variant_name(t.number)),
                             tuple(t.values)))
    return out


def plan(exp: Experiment, chosen: list[Candidate]) -> list[tuple[Candidate, list[PlannedRun]]]:
    return [(c, [space.planned(exp, c.variant, s) for s in exp.search.confirm.seeds]) for c in chosen]


def run_confirmation(s, chosen: list[Candidate], shard: tuple[int, int] | None = None) -> None:
    """Train (or reuse) every candidate x ``confirm.seeds`` under the search's parent run."""
    from rcnn_lab.runner.sweep import run_plan

    for c, runs in plan(s.exp, chosen):
        if shard is not None:
            runs = runs[shard[0]::shard[1]]
        if not runs:
            continue
        stage = "baseline" if c.number is None else "confirm"
        child = {tags.STUDY: s.study.study_name, tags.STAGE: stage}
        if c.number is not None:
            child[tags.TRIAL] = str(c.number)
        run_plan(s.exp, runs, parent=s.parent, child_tags=child, progress=s.progress, echo=s.echo, root=s.root)


def _nest(values: dict) -> dict:
    out: dict = {}
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def export(exp: Experiment, values: dict, dst: str | Path, note: str) -> Path:
    """Write a runnable experiment: ``base:`` the search's file, ``search:`` off, the chosen keys set."""
    dst = Path(dst)
    if dst.exists() and dst.is_dir():
        raise ConfigError([Problem("--export", f"{display_path(dst)} is a folder; name a .yaml file")])
    base = os.path.relpath(Path(exp.path).resolve(), dst.resolve().parent)
    body: dict = {"base": base, "search": None}
    if len(exp.variants) > 1:  # the baseline variant alone, with its own overrides
        body.update(variants=None, grid=None, baseline=None)
        values = {**exp.baseline.changed, **values}
    body.update(_nest(values))
    text = "".join(f"# {line}\n" for line in note.splitlines()) + yaml.safe_dump(body, sort_keys=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(dst)  # never a half-written file
    return dst
