"""Reports over a search: the trials table, the confirmed ranking (paired statistics vs the baseline), plots.

The confirmation uses ``report.stats.summary`` on the candidates' runs, found by config hash (a run
reused from an ordinary sweep counts as the trial's), so mean, CI, delta, paired p, Holm over the k
comparisons and seeds needed are the report's own; the table also gives each trial's single-seed value
and says where the two rankings disagree (the winner's curse).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from rcnn_lab.report.render import markdown
from rcnn_lab.report.stats import summary

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def trials(exp, study) -> pd.DataFrame:
    """One row per counted trial: number, state, objective value(s), searched keys, iteration reached, run id."""
    from rcnn_lab.search import driver, feasible, space

    names = list(exp.search.objective)
    rows = []
    for t in driver.counted(study.get_trials(deepcopy=False)):
        row = {"trial": t.number, "state": STATE_NAMES.get(t.state.name, t.state.name.lower())}
        for i, n in enumerate(names):
            row[n] = t.values[i] if t.values is not None and len(t.values) > i else math.nan
        if exp.search.constraints:
            row.update({m: v for m, v in feasible.metrics_of(exp.search, t).items() if m not in names})
            row["feasible"] = t.state.name == "COMPLETE" and feasible.feasible(exp.search, t)
        row.update(space.stored(exp.search.space, t.params))
        steps = sorted(t.intermediate_values)  # a trial told complete records the iterations it trained
        row["iteration"] = t.user_attrs.get(driver.ITERATION, steps[-1] if steps else None)
        row["run_id"] = t.user_attrs.get(driver.RUN_ID)
        row["reused"] = bool(t.user_attrs.get(driver.REUSED, False))
        rows.append(row)
    return pd.DataFrame(rows)


def confirmation(exp, study, runs_df: pd.DataFrame) -> pd.DataFrame:
    """The confirmed ranking: ``stats.summary`` over the candidates x ``confirm.seeds`` (best mean first), with
    ``single`` (the trial's one-seed value), ``single_rank`` and ``rank`` columns. Empty before any confirmation."""
    from rcnn_lab.search import confirm

    chosen = confirm.candidates(exp, study)
    by_hash = {r.hash: c for c, runs in confirm.plan(exp, chosen) for r in runs}
    df = runs_df[runs_df["config_hash"].isin(by_hash)].copy()
    if df.empty or len(chosen) < 2:
        return pd.DataFrame()
    df["variant"] = [by_hash[h].label for h in df["config_hash"]]
    df["baseline"] = [by_hash[h].number is None for h in df["config_hash"]]
    search = exp.search
    table = summary(df, metrics=list(dict.fromkeys([*search.objective, *search.constraints])))
    single = {c.label: (c.single[0] if c.single else math.nan) for c in chosen}
    table["single"] = table["variant"].map(single)
    tops = table[~table["baseline"]].copy()
    if search.constraints:
        table["feasible"] = missed(search, table) <= 0
        tops["feasible"] = table["feasible"]
    tops["rank"] = confirmed_rank(search, tops)
    # the single-seed ranking is the order the search chose them in (``feasible.ranked``)
    position = {c.label: i + 1 for i, c in enumerate(c for c in chosen if c.number is not None)}
    tops["single_rank"] = tops["variant"].map(position)
    table = pd.concat([table[table["baseline"]], tops.sort_values("rank")], ignore_index=True)
    table.attrs.update(tops.attrs or table.attrs)
    return table


def missed(search, table: pd.DataFrame) -> pd.Series:
    """Per row of a summary table: by how much its means miss ``search.constraints`` (0: they meet them)."""
    if not search.constraints:
        return pd.Series(0.0, index=table.index)
    return table.apply(lambda row: search.shortfall({m: row[f"{m}_mean"] for m in search.constraints}), axis=1)


def confirmed_rank(search, tops: pd.DataFrame) -> list[int]:
    """The confirmed ranking (1 = best) of summary rows: means that meet the constraints first (the less they miss
    the better), then the first objective's mean; the trials' own rule (``search.feasible.ranked``) on means."""
    metric = next(iter(search.objective))
    sign = -1.0 if search.objective[metric] == "max" else 1.0
    key = list(zip(missed(search, tops), sign * tops[f"{metric}_mean"]))
    return [1 + sum(other < k for other in key) for k in key]


def disagrees(table: pd.DataFrame) -> bool:
    """True when the confirmed ranking orders the top trials differently from their single-seed values."""
    if table.empty or "rank" not in table:
        return False
    tops = table[~table["baseline"]]
    return list(tops.sort_values("rank")["variant"]) != list(tops.sort_values("single_rank")["variant"])


def confirmation_markdown(exp, table: pd.DataFrame) -> str:
    if table.empty:
        return "(no confirmation runs yet)"
    m = next(iter(exp.search.objective))
    cols = {"variant": "config", "single": f"{m} (1 seed)", f"{m}_mean": f"{m} mean", f"{m}_ci_low": "CI low",
            f"{m}_ci_high": "CI high", f"{m}_delta": "delta", f"{m}_p": "p", f"{m}_p_holm": "p (Holm)",
            f"{m}_seeds": "seeds needed", f"{m}_n": "n"}
    for other in dict.fromkeys([*list(exp.search.objective)[1:], *exp.search.constraints]):
        cols.update({f"{other}_mean": f"{other} mean", f"{other}_delta": f"{other} delta", f"{other}_p_holm": f"{other} p (Holm)"})
    if "feasible" in table:
        cols["feasible"] = "meets constraints"
    shown = table[[c for c in cols if c in table]].rename(columns=cols)
    text = markdown(shown.map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)))
    if disagrees(table):
        text += ("\n\nThe confirmed ranking differs from the single-seed one (the winner's curse): "
                 "trust the confirmed means.")
    return text


def trials_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no trials yet)"
    shown = frame.drop(columns=["run_id"])
    return markdown(shown.map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)))


def plots(exp, study, frame: pd.DataFrame, folder: Path) -> list[Path]:
    """PNGs: objective vs trial with the running best, objective vs each searched key, parameter importance
    (``optuna.importance``), and the Pareto front when there are several objectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    done = frame[frame["state"] == "complete"] if not frame.empty else frame
    names = list(exp.search.objective)
    if done.empty:
        return out
    m, best = names[0], (max if exp.search.objective[names[0]] == "max" else min)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(done["trial"], done[m], "o", label=m)
    running = done[m].expanding().apply(lambda v: best(v)).tolist()
    ax.step(done["trial"], running, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(m)
    ax.legend()
    out.append(_save(fig, folder / "search_history.png", plt))
    for p in exp.search.space:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        x = done[p.key].map(lambda v: v if isinstance(v, (int, float)) else str(v))
        ax.plot(x, done[m], "o")
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(m)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        out.append(_save(fig, folder / f"search_{p.key.replace('.', '_')}.png", plt))
    for i, name in enumerate(names):  # one per objective: what decides the cost need not decide the accuracy
        importance = _importance(study, len(names), i)
        if importance:
            fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importance)))
            ax.barh(list(importance)[::-1], list(importance.values())[::-1])
            ax.set_xlabel(f"importance for {name} (fANOVA)")
            out.append(_save(fig, folder / ("search_importance.png" if i == 0 else f"search_importance_{name}.png"), plt))
    if len(names) >= 2:
        from rcnn_lab.search import confirm, feasible

        ok = [t for t in confirm.finished_trials(study) if feasible.feasible(exp.search, t)]
        front = {t.number for t in feasible.front(exp.search, ok)}
        fig, ax = plt.subplots(figsize=(6, 4.5))
        on = done["trial"].isin(front)
        ax.plot(done.loc[~on, names[1]], done.loc[~on, m], "o", color="0.6", label="trials")
        pareto = done[on].sort_values(names[1])
        bounded = exp.search.constraints
        ax.plot(pareto[names[1]], pareto[m], "o-", color="C3",
                label="Pareto front of the trials that meet the constraints" if bounded else "Pareto front")
        for name, bound in bounded.items():  # a constraint on an axis: its bound as a line
            for value in (bound.min, bound.max):
                if value is not None and name in names[:2]:
                    line = ax.axvline if name == names[1] else ax.axhline
                    line(value, color="0.4", linestyle="--", linewidth=1, label=f"{name} bound {value:g}")
        ax.set_xlabel(names[1])
        ax.set_ylabel(m)
        ax.legend()
        out.append(_save(fig, folder / "search_pareto.png", plt))
    return out


def _importance(study, n_objectives: int, index: int = 0) -> dict:
    import warnings

    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    try:
        target = (lambda t: t.values[index]) if n_objectives > 1 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), target=target))
    except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials, or a key that never varied
        return {}


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def studies(experiments, tracking_uri: str | None = None) -> list:
    """(experiment, study) of each experiment file given that has ``search:`` and a study in its storage
    (read-only: a storage that does not exist yet is not created)."""
    from pathlib import Path as _Path

    from rcnn_lab.engine.preflight import load_names
    from rcnn_lab.runner import tracking as tr
    from rcnn_lab.search import study as st

    out = []
    for item in [experiments] if isinstance(experiments, (str, _Path)) else experiments:
        if not str(item).endswith((".yaml", ".yml")) or not _Path(item).is_file():
            continue
        exp = load_names(item)
        if exp.search is None:
            continue
        url = st.storage_url(exp.search, tracking_uri or tr.resolve_uri(exp.tracking.uri))
        db = tr.sqlite_path(url)
        if db is not None and not db.exists():
            continue
        import optuna

        st.quiet_optuna()
        try:
            out.append((exp, optuna.load_study(study_name=st.study_name(exp), storage=st.storage(url))))
        except KeyError:  # no study of this space yet
            continue
    return out


def parent_runs(searched) -> dict[str, str]:
    """MLflow experiment name -> the search's parent run (``rcnn_lab.kind = search``) of each (experiment, study)."""
    from rcnn_lab.search import study as st

    out = {}
    for exp, study in searched:
        run_id = study.user_attrs.get(st.PARENT_ATTR)
        if run_id:
            out[exp.tracking_name] = run_id
    return out
