"""``rcnn-lab search``: a hyperparameter search (``search:`` in the experiment) on Optuna, tracked in MLflow."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from rcnn_lab.errors import ConfigError, Problem, display_path

WORKER_ENV = "RCNN_LAB_SEARCH_WORKER"  # set for --parallel workers: their coordinator ends the parent run


def add_arguments_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXP.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to the baseline before searching (repeatable)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (sets train.device)")
    p.add_argument("--dry-run", action="store_true", help="print the search (space, budget, trials so far) and write nothing")
    p.add_argument("--shard", metavar="I/N", help="one of N workers on the same search (array jobs; the confirmation "
                   "stage is split the same way)")
    p.add_argument("--parallel", type=int, metavar="K", help="K worker processes on the same search (one GPU each, "
                   "or cores/K CPU threads each)")
    p.add_argument("--nproc", type=int, metavar="N", help="train each trial (and the confirmation stage) on N local "
                   "DDP ranks, data.batch_size being the global batch as for `run --nproc` (needs pruner: none)")
    p.add_argument("--rank-of", help=argparse.SUPPRESS)  # internal: what a --nproc rank trains (search.ddp)
    p.add_argument("--export", metavar="BEST.yaml", help="write the best configuration (confirmed when there is a "
                   "confirmation stage) as a runnable experiment")
    p.add_argument("--no-confirm", action="store_true", help="skip the confirmation stage")
    p.add_argument("--report", metavar="FOLDER", help="write the trials table, confirmation table and plots here "
                   "(and attach them to the search's parent run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: plain log lines")


def _load(args):
    from rcnn_lab.engine.preflight import load_experiment

    flags = {"--device": ("train.device", args.device)} if args.device else None
    exp = load_experiment(args.experiment, args.overrides, flags=flags)
    if exp.search is None:
        raise ConfigError([Problem("search", "this experiment has no search: section; add one (see docs/search.md)",
                                   display_path(exp.path))])
    return exp


def _dry_run(exp) -> int:
    from rcnn_lab.runner import tracking as tr
    from rcnn_lab.search import driver
    from rcnn_lab.search import study as st

    s = exp.search
    uri = tr.resolve_uri(exp.tracking.uri)
    url = st.storage_url(s, uri)
    print(f"{exp.name}: search {st.study_name(exp)} ({exp.path})")
    print(f"  storage   {url}")
    for p in s.space:
        what = list(p.choices) if p.kind == "choice" else f"[{p.low}, {p.high}]" + (" log" if p.log else "") + (
            f" step {p.step}" if p.step not in (None, 1) else "")
        print(f"  {p.kind:<7} {p.key}: {what}")
    print(f"  objective {', '.join(f'{k} ({v})' for k, v in s.objective.items())}; sampler {s.sampler.type} "
          f"(seed {s.sampler.seed}); pruner {s.pruner.type}; budget {s.budget.trials} trials"
          + (f" / {s.budget.hours} h" if s.budget.hours else ""))
    print(f"  trial     = baseline {exp.baseline.name!r} + the searched keys, seed {exp.seeds[0]}")
    if s.confirm.top_k:
        print(f"  confirm   top {s.confirm.top_k} + baseline on seeds {s.confirm.seeds}")
    missing = url.startswith("sqlite:///") and tr.sqlite_path(url) is not None and not tr.sqlite_path(url).exists()
    if missing or url.startswith(st.JOURNAL):
        print("  trials so far: 0" if missing else "  trials so far: (journal storage; not opened by --dry-run)")
        return 0
    import optuna

    st.quiet_optuna()
    try:
        study = optuna.load_study(study_name=st.study_name(exp), storage=url)
    except KeyError:
        print("  trials so far: 0")
        return 0
    counted = driver.counted(study.get_trials(deepcopy=False))
    states = {}
    for t in counted:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    print(f"  trials so far: {len(counted)} ({', '.join(f'{n} {k}' for k, n in states.items()) or 'none'})")
    hours = driver.spent_s(study.user_attrs) / 3600
    print(f"  time spent: {hours:.3g} h" + (f" of {s.budget.hours:g} h" if s.budget.hours else "")
          + " (all invocations together)")
    return 0


def _spawn(args, k: int, cuda: bool) -> int:
    from rcnn_lab.runner.parallel import strip_option, worker_env

    base = strip_option(strip_option(strip_option(args.argv, "--parallel"), "--export"), "--report")
    procs = [subprocess.Popen([sys.executable, "-m", "rcnn_lab", *base, "--shard", f"{i}/{k}", "--no-progress"],
                              env={**worker_env(i, k, cuda), WORKER_ENV: "1"}) for i in range(k)]
    try:
        return max(p.wait() for p in procs)
    except KeyboardInterrupt:
        for p in procs:
            p.wait()
        raise


def _check_nproc(exp, args) -> None:
    from rcnn_lab.engine.distributed import env_world

    n = args.nproc
    if args.rank_of and not env_world().active:
        raise ConfigError([Problem("--rank-of", "is set by `search --nproc` for its ranks; drop it")])
    problem = None
    if n is None:
        return
    if n < 1:
        problem = f"must be >= 1, got {n}"
    elif n > 1 and args.parallel and args.parallel > 1:
        problem = "cannot be combined with --parallel; use one of them"
    elif n > 1 and exp.search.pruner.type != "none":
        problem = (f"the {exp.search.pruner.type} pruner decides in one process, and --nproc {n} trains each trial on {n}; "
                   "set search.pruner.type: none, or drop --nproc")
    if problem:
        raise ConfigError([Problem("--nproc", problem)])


def cmd_search(args) -> int:
    from rcnn_lab.runner.plan import parse_shard

    exp = _load(args)
    shard = parse_shard(args.shard)
    if args.dry_run:
        return _dry_run(exp)
    _check_nproc(exp, args)
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError([Problem("--parallel", f"must be >= 1, got {args.parallel}")])
    if args.parallel and args.parallel > 1 and shard:
        raise ConfigError([Problem("--parallel", "cannot be combined with --shard (it starts the shards itself)")])
    # torch, Optuna and MLflow from here on: the experiment is valid
    from rcnn_lab.engine.preflight import preflight
    from rcnn_lab.runner import tracking as tr
    from rcnn_lab.search import confirm, driver, space
    from rcnn_lab.search import study as st

    baseline = space.planned(exp, exp.baseline)
    ddp_n = args.nproc if args.nproc and args.nproc > 1 else 0
    if ddp_n:
        from rcnn_lab.runner.parallel import check_world

        check_world([baseline], ddp_n, display_path(exp.path))
    inputs = preflight([baseline])  # device and datasets, before anything is written
    uri = tr.resolve_uri(exp.tracking.uri)
    c = tr.client(uri)
    exp_id = tr.experiment_id(c, exp.tracking_name, tr.default_artifact_root(uri))
    url = st.storage_url(exp.search, uri)
    study = st.open_study(exp, url)
    if args.rank_of:  # one of the --nproc ranks: the search process made the parent run and owns the trials
        from rcnn_lab.search import ddp

        s = driver.Search(exp, study, url, c, exp_id, study.user_attrs[st.PARENT_ATTR])
        return ddp.rank_main(s, args.rank_of)
    parent = st.parent_run(c, exp_id, exp, study, url, tr.common_tags(exp, 1))
    s = driver.Search(exp, study, url, c, exp_id, parent, progress=not args.no_progress and sys.stderr.isatty())
    if ddp_n:
        from rcnn_lab.search import ddp

        s.train = ddp.trainer(s, ddp_n, args.argv)
    print(f"search {study.study_name}: storage {url}, parent run {parent}")
    status = "KILLED"
    try:
        with tr.Heartbeat(c, parent):
            if args.parallel and args.parallel > 1:
                code = _spawn(args, args.parallel, inputs[baseline.hash].device.type == "cuda")
                if code:
                    return code
            else:
                driver.run_search(s)
                driver.wait_for_running(s)
                if exp.search.confirm.top_k and not args.no_confirm:
                    if ddp_n:
                        ddp.confirm(ddp_n, args.argv)
                    else:
                        confirm.run_confirmation(s, confirm.candidates(exp, study), shard)
        status = "FINISHED"
    finally:
        try:
            if not os.environ.get(WORKER_ENV):
                c.set_terminated(parent, status)
        except Exception:  # the store may be what failed
            pass
    if shard is None:
        _results(args, exp, s, c)
    return 0


def _results(args, exp, s, c) -> None:
    from pathlib import Path

    from rcnn_lab.report import search as rs
    from rcnn_lab.report.data import runs
    from rcnn_lab.search import confirm

    frame = rs.trials(exp, s.study)
    print("\ntrials\n" + rs.trials_markdown(frame))
    table = None
    if exp.search.confirm.top_k and not args.no_confirm:
        table = rs.confirmation(exp, s.study, runs(str(exp.path)))
        print("\nconfirmation (seeds " + ", ".join(map(str, exp.search.confirm.seeds)) + ")\n"
              + rs.confirmation_markdown(exp, table))
    if args.report:
        folder = Path(args.report)
        files = rs.plots(exp, s.study, frame, folder)
        (folder / "trials.md").write_text(rs.trials_markdown(frame) + "\n")
        files.append(folder / "trials.md")
        if table is not None:
            (folder / "confirmation.md").write_text(rs.confirmation_markdown(exp, table) + "\n")
            files.append(folder / "confirmation.md")
        for f in files:
            c.log_artifact(s.parent, str(f), "search_report")
        print(f"report: {len(files)} file(s) in {display_path(folder)}, attached to run {s.parent}")
    if args.export:
        best = _best(exp, s.study, table)
        if best is None:
            raise ConfigError([Problem("--export", "no completed trial to export yet; run the search first")])
        number, values, why = best
        path = confirm.export(exp, values, args.export, f"rcnn-lab search {exp.path}: trial {number} ({why})")
        print(f"exported trial {number} to {display_path(path)} ({why})")


def _best(exp, study, table):
    from rcnn_lab.search import confirm, space

    if table is not None and not table.empty and "rank" in table:
        tops = table[~table["baseline"]].sort_values("rank")
        number = int(tops["variant"].iloc[0].split("-")[1])
        t = study.trials[number]
        return number, space.stored(exp.search.space, t.params), "best confirmed mean"
    ranked = confirm.ranked(exp, study)
    if not ranked:
        return None
    t = ranked[0]
    return t.number, space.stored(exp.search.space, t.params), "best single-seed value"
