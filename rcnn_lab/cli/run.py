"""``rcnn-lab run`` (train and evaluate every variant x seed) and ``rcnn-lab ui``."""

from __future__ import annotations

import argparse
import sys

from rcnn_lab.errors import ConfigError, Problem


def add_arguments_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", metavar="EXP.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to every variant (repeatable)")
    p.add_argument("--only", help="comma-separated variant names")
    p.add_argument("--seeds", help="comma-separated seeds (replaces the experiment's seeds)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (sets train.device)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--force", action="store_true", help="rerun configs that already have a finished run")
    p.add_argument("--restart", action="store_true",
                   help="start over the interrupted runs whose checkpoint cannot be resumed (truncated, empty, foreign, "
                        "past the run's end) instead of refusing")
    p.add_argument("--shard", metavar="I/N", help="run only slice I of N of the plan (array jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: plain log lines every train.log_every iterations instead")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train each run on N local processes with DistributedDataParallel (rendezvous on 127.0.0.1 only); "
                        "data.batch_size is the global batch")
    p.add_argument("--parallel", type=int, metavar="K",
                   help="train K runs at once in K worker processes (one GPU each, or cores/K CPU threads each)")
    p.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)  # --parallel workers


def _seeds(text: str | None) -> list[int] | None:
    import re

    from rcnn_lab.config.guards import MAX_SEEDS, check_seeds
    from rcnn_lab.errors import excerpt

    if text is None:
        return None
    parts = [s.strip() for s in text.split(",") if s.strip()]
    if len(parts) > MAX_SEEDS:  # before converting: 100,000 seeds answer at once
        check_seeds([0] * len(parts), "--seeds", None)
    bad = next((s for s in parts if not re.fullmatch(r"[+-]?[0-9]+", s)), None)
    if bad is not None:
        raise ConfigError([Problem("--seeds", f"expected comma-separated integers like 0,1,2, got {excerpt(bad)}")])
    if not parts:
        raise ConfigError([Problem("--seeds", "needs at least one seed")])
    return check_seeds([int(s) if len(s) <= 30 else 2**64 for s in parts], "--seeds", None)  # 2**64: out of range


def print_summary(outcomes, echo=print) -> None:
    keys = ["bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"]
    rows = [("variant", "seed", "status", *keys, "duration")]
    for o in outcomes:
        vals = [f"{o.metrics[k]:.3f}" if k in o.metrics else "-" for k in keys]
        status = f"{str(o.status).lower()}, not yet stored" if o.unstored else str(o.status)  # the store holds it RUNNING
        rows.append((o.run.variant.name, str(o.run.seed), status, *vals, f"{o.duration_s:.0f}s" if o.duration_s else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    echo("")
    for r in rows:
        echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def cmd_run(args) -> int:
    from rcnn_lab.cli.notes import print_warnings
    from rcnn_lab.engine.preflight import load_experiment, preflight
    from rcnn_lab.errors import display_path
    from rcnn_lab.runner.plan import make_plan, parse_shard

    exp = load_experiment(args.experiment, args.overrides, flags={"--device": ("train.device", args.device)} if args.device else None)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    plan = make_plan(exp, only, _seeds(args.seeds), parse_shard(args.shard))
    _check_scale_flags(args)  # --dry-run refuses what the run would refuse
    from rcnn_lab.runner.tracking import resolve_uri

    resolve_uri(exp.tracking.uri)  # a URI that cannot name a store: one line (exit 3) before anything else
    # torch and MLflow from here on: the experiment and the plan are valid
    from rcnn_lab.engine.distributed import env_world
    from rcnn_lab.runner.launch import launch_local
    from rcnn_lab.runner.outcome import Status
    from rcnn_lab.runner.parallel import check_world, run_parallel
    from rcnn_lab.runner.resume import check_resumes
    from rcnn_lab.runner.sweep import plan_actions, run_plan

    check_world(plan, args.nproc, display_path(exp.path))
    if env_world().main:
        print_warnings(exp, "run", plugins=not args.no_summary)

    if args.dry_run:  # read-only: no store, no outputs
        check_resumes(exp, plan, force=args.force, restart=args.restart, dry_run=True)
        actions = plan_actions(exp, plan, args.force)
        print(f"{exp.name}: {len(plan)} run(s) ({exp.path})")
        for run, action in actions:
            print(f"  {action:<7}{run.variant.name:<40} seed={run.seed:<4} {run.hash}")
        return 0
    inputs = preflight(plan)  # every run's device and datasets, checked once
    if env_world().main:  # the launcher and rank 0: a checkpoint that cannot be resumed is refused (or --restart)
        check_resumes(exp, plan, force=args.force, restart=args.restart, inputs=inputs,
                      world_size=args.nproc if args.nproc and args.nproc > 1 else env_world().size)
    from rcnn_lab.runner.weights import resolve_inputs

    inputs = resolve_inputs(exp, plan, inputs)  # model.weights run:<id>: in the store, finished, with a checkpoint
    argv = getattr(args, "argv", None) or sys.argv[1:]
    if args.nproc and args.nproc > 1:
        return launch_local(args.nproc, argv)
    if args.parallel and args.parallel > 1:
        from rcnn_lab.runner.sweep import all_finished

        done = all_finished(exp, plan, args.force)
        if done is not None:  # nothing to train: no workers
            print_summary(done)
            return 0
        cuda = bool(plan) and inputs[plan[0].hash].device.type == "cuda"
        del inputs  # the workers check and load their own runs
        from rcnn_lab.report.sweep_summary import summarize

        outcomes, code = run_parallel(exp, plan, args.parallel, argv, cuda, summarize)
        print_summary(outcomes)
        return code
    from rcnn_lab.report.sweep_summary import summarize

    outcomes = run_plan(exp, plan, inputs=inputs, force=args.force,
                        progress=not args.no_progress and sys.stderr.isatty(), summarize=summarize)
    if env_world().main and not args.no_summary:
        print_summary(outcomes)
    if any(o.unstored for o in outcomes):
        return 3  # trained, but the tracking store stopped answering: the last line said how to store the rest
    return 1 if any(o.status == Status.FAILED for o in outcomes) else 0


def _check_scale_flags(args) -> None:
    problems = [Problem(flag, f"must be >= 1, got {value}")
                for flag, value in (("--nproc", args.nproc), ("--parallel", args.parallel)) if value is not None and value < 1]
    if args.nproc and args.parallel and args.nproc > 1 and args.parallel > 1:
        problems.append(Problem("--parallel", "cannot be combined with --nproc; use one of them"))
    if args.parallel and args.parallel > 1 and args.shard:
        problems.append(Problem("--parallel", "cannot be combined with --shard (it shards the plan itself)"))
    if problems:
        raise ConfigError(problems)


def add_arguments_ui(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", metavar="EXP.yaml", help="use this experiment's tracking.uri")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (1-65535, default 5000)")
    p.add_argument("--uri", help="tracking store (default: tracking.uri / MLFLOW_TRACKING_URI / runs/mlflow.db)")


def cmd_ui(args) -> int:
    import os

    from rcnn_lab.runner.tracking import default_artifact_root, resolve_uri, ui_page

    if not 1 <= args.port <= 65535:  # before anything: mlflow ui would create the store, then fail to bind
        raise ConfigError([Problem("--port", f"must be a TCP port in 1..65535, got {args.port}")])
    configured, name = args.uri, None
    if args.experiment:
        from rcnn_lab.engine.preflight import load_names

        exp = load_names(args.experiment)
        configured, name = configured or exp.tracking.uri, exp.tracking_name
    uri = resolve_uri(configured)
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is an MLflow server: it serves its own UI, open {ui_page(uri, uri, name)} in a browser")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    root = default_artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    print(f"MLflow UI for {uri}: open {ui_page(f'http://127.0.0.1:{args.port}', uri, name)}", flush=True)
    os.execv(sys.executable, cmd)
    return 0
