"""``rcnn-lab report``: aggregate finished runs of one or more experiments into a table and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rcnn_lab.errors import ConfigError, Problem

FORMATS = ("md", "csv", "html", "json")
MAX_GRID_KEYS = 2  # without --group-by, plot metric-vs-value only for experiments that vary at most this many numeric keys


def add_arguments_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiments", nargs="+", metavar="EXP.yaml|EXPERIMENT",
                   help="experiment files or MLflow experiment names (several: one combined table)")
    p.add_argument("--metric", dest="metrics", action="append", metavar="NAME",
                   help="final metric to summarize (repeatable or comma-separated, e.g. segm_AP,bbox_AP50; "
                   "default: bbox_AP and segm_AP); NAME@STEPS: a training metric's mean over each run's last STEPS "
                   "steps, e.g. loss_rpn_box_reg@200 or grad_norm/loss_mask/rpn.head.bbox_pred@500")
    p.add_argument("--format", choices=FORMATS, help="table format (default: from --out's suffix, else md)")
    p.add_argument("--out", metavar="PATH",
                   help="write the table to PATH (a folder gets report.<format>) and PNG plots next to it")
    p.add_argument("--group-by", metavar="KEY", help="rows per value of this dotted config key instead of per variant")
    p.add_argument("--baseline", metavar="NAME", help="variant (or --group-by value) to compare against "
                   "(default: the experiment's baseline)")
    p.add_argument("--confidence", type=float, default=0.95, metavar="LEVEL", help="confidence level of the intervals (default 0.95)")
    p.add_argument("--uri", help="tracking store (default: tracking.uri / MLFLOW_TRACKING_URI / runs/mlflow.db)")
    p.add_argument("--no-log", action="store_true",
                   help="with --out: do not attach the plots to each experiment's latest sweep run in MLflow "
                   "(an experiment with a search: to its search's parent run)")
    p.add_argument("--mde", type=float, metavar="POINTS", help="minimum detectable effect in AP points (1 = 0.01 AP): "
                   "adds the paired seeds needed to detect it (alpha 0.05, power 0.8)")
    p.add_argument("--per-class", action="store_true", help="per-category AP table (from each run's eval/per_class.json)")
    p.add_argument("--errors", action="store_true", help="COCO error breakdown (C75 C50 Loc Sim Oth BG FN) table, "
                   "stacked bars and precision-recall curves at IoU 0.5 / 0.75, from each run's saved detections")
    p.add_argument("--gallery", action="store_true", help="prediction grid: rows variants, columns the eval.gallery images")
    p.add_argument("--seed", type=int, metavar="N", help="the seed whose runs --gallery draws (default: the lowest all have)")
    p.add_argument("--cost", default="gflops", metavar="NAME", help="x axis of the cost-vs-metric plot: gflops (default), "
                   "params, peak_memory_mb, train_time_s, images_per_s, eval_images_per_s")


def _metrics(values: list[str] | None) -> list[str] | None:
    from rcnn_lab.report.steps import is_step_metric, parse

    if not values:
        return None
    names = [m.strip() for v in values for m in v.split(",") if m.strip()]
    if not names:
        raise ConfigError([Problem("--metric", "needs a metric name, e.g. --metric segm_AP")])
    for name in names:
        if is_step_metric(name):
            parse(name)  # a malformed NAME@STEPS fails here, before any store is read
    return list(dict.fromkeys(names))


def _file_part(metric: str) -> str:
    """A metric name as part of a plot's file name (``grad_norm/loss_mask/rpn.head.conv@500`` has slashes)."""
    from rcnn_lab.runner.plan import file_part

    return file_part(metric)


def output_paths(out: str, fmt: str | None) -> tuple[Path, Path, str]:
    """--out -> (table file, stem for plot names, format): a folder (or suffix-less path) gets ``report.<fmt>``."""
    path = Path(out)
    suffix = path.suffix.lstrip(".").lower()
    if path.is_dir() or not suffix:
        fmt = fmt or "md"
        return path / f"report.{fmt}", path / "report", fmt
    fmt = fmt or (suffix if suffix in FORMATS else "md")
    return path, path.with_suffix(""), fmt


def grid_keys(table, group_by: str | None) -> list[str]:
    """Config keys worth a metric-vs-value plot: --group-by, else the numeric changed keys of a small grid."""
    if group_by is not None:
        return [group_by]
    keys = []
    for key in table.attrs.get("changed_keys", []):
        values = [v for v in table[key] if v is not None and not (isinstance(v, float) and v != v)]  # NaN: key not logged
        numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and len(set(values)) >= 2:
            keys.append(key)
    return keys if len(keys) <= MAX_GRID_KEYS else []


def write_plots(table, df, stem: Path, group_by: str | None, uri: str | None, cost: str = "gflops") -> list[Path]:
    """PNG plots named ``<stem>_<what>.png``: one per metric, cost vs metric, loss curves, metric-vs-value for grids.

    When the variants set one numeric key to several values (a scan, e.g. ``proposal_gradient_scale``),
    its metric-vs-value plot is ``plot_param``'s: the variants that keep the key are reference lines.
    """
    from rcnn_lab.report import param_key, plot_cost, plot_grid, plot_losses, plot_metric, plot_param
    from rcnn_lab.report.stats import summary_metrics

    written = []
    metrics = summary_metrics(table)
    for m in metrics:
        written.append(plot_metric(table, m, f"{stem}_{_file_part(m)}.png"))
    for m in metrics:
        scatter = plot_cost(table, m, f"{stem}_{_file_part(m)}_vs_{cost}.png", cost)
        if scatter is not None:
            written.append(scatter)
    scan = param_key(table) if group_by is None else None
    keys = grid_keys(table, group_by)
    for key in ([scan] if scan else []) + [k for k in keys if k != scan]:
        short = key.replace(".", "_")
        for m in metrics:
            plot = plot_param if key == scan else plot_grid
            written.append(plot(table, m, key, f"{stem}_{_file_part(m)}_vs_{short}.png"))
    losses = plot_losses(df, f"{stem}_losses.png", uri)
    if losses is not None:
        written.append(losses)
    return written


def log_to_sweeps(df, files: list[Path], echo, searches: dict[str, str] | None = None) -> None:
    """Attach ``files`` under ``report/`` to the latest sweep (parent) run of every experiment in ``df``; an
    experiment in ``searches`` (MLflow experiment name -> the search's parent run) gets them on its search's run."""
    from mlflow import MlflowClient

    from rcnn_lab.runner import tags

    for name, uri in df.attrs.get("tracking_uris", {}).items():
        client = MlflowClient(tracking_uri=uri)
        run_id = (searches or {}).get(name)
        if run_id is None:
            exp = client.get_experiment_by_name(name)
            parents = client.search_runs([exp.experiment_id], filter_string=tags.filter_equals(tags.KIND, tags.SWEEP),
                                         order_by=["attributes.start_time DESC"], max_results=1) if exp else []
            if not parents:
                echo(f"note: experiment {name!r} has no sweep run to attach the report to")
                continue
            run_id = parents[0].info.run_id
        try:
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path="report")
        except Exception as exc:  # the report itself is written; attaching it is best effort
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            echo(f"warning: could not attach the report to run {run_id} of {name!r}: {first}")
            continue
        echo(f"attached {len(files)} file(s) to run {run_id} of {name!r} (artifacts: report/)")


def analysis(args, df, stem: Path | None, searched: list | None = None) -> tuple[dict, list[Path]]:
    """--per-class / --errors / --gallery, and the search tables of ``searched`` ((experiment, study) pairs):
    (heading -> table, written PNGs); PNGs only with a ``stem``."""
    from rcnn_lab.report import errors, per_class, plot_errors, plot_gallery, plot_pr

    tables, plots = {}, []
    def shown(frame):  # the experiment column only when there are several
        return frame[[c for c in frame.columns if c not in ("pr50", "pr75") and (c != "experiment" or frame[c].nunique() > 1)]]

    if args.per_class:
        tables["Per-category AP (IoU .50:.95, mean over seeds)"] = shown(per_class(df, tracking_uri=args.uri))
    if args.errors:
        err = errors(df, tracking_uri=args.uri)
        tables["COCO error breakdown (cumulative AP, mean over seeds)"] = shown(err)
        for iou_type in dict.fromkeys(err["iou_type"]):
            if stem is not None:
                plots += [plot_errors(err, iou_type, f"{stem}_errors_{iou_type}.png"),
                          plot_pr(err, iou_type, f"{stem}_pr_{iou_type}.png")]
    if args.gallery and stem is not None:
        plots.append(plot_gallery(df, f"{stem}_gallery.png", seed=args.seed, tracking_uri=args.uri))
    from rcnn_lab.report import search

    for exp, study in searched or []:  # experiments with a search: its trials
        frame = search.trials(exp, study)
        tables[f"Search {study.study_name}: trials"] = frame.drop(columns=["run_id"])
        confirmed = search.confirmation(exp, study, df[df["experiment"] == exp.name])
        if not confirmed.empty:
            tables[f"Search {study.study_name}: confirmation"] = confirmed[
                [c for c in confirmed.columns if c in ("variant", "single", "rank", "single_rank")
                 or c.startswith(tuple(exp.search.objective))]]
        if stem is not None:
            plots += search.plots(exp, study, frame, Path(f"{stem}_search"))
    return tables, plots


def cmd_report(args) -> int:
    if args.uri:  # a URI that cannot name a store: one line (exit 3) before pandas and MLflow load
        from rcnn_lab.runner.store_uri import check_uri

        check_uri(args.uri)
    from rcnn_lab.report import html_report, render, runs, summary
    from rcnn_lab.report.cost import COSTS
    from rcnn_lab.report.render import markdown
    from rcnn_lab.report.stats import mixed_environments
    from rcnn_lab.report.steps import add_step_means, is_step_metric

    metrics = _metrics(args.metrics)
    if args.cost not in COSTS:  # checked before anything is written
        from rcnn_lab.errors import did_you_mean

        raise ConfigError([Problem("--cost", f"unknown cost {args.cost!r}{did_you_mean(args.cost, list(COSTS))} "
                                   f"(costs: {', '.join(COSTS)})")])
    if args.out:  # before the store is read: an --out that cannot be written fails first, with nothing written
        from rcnn_lab.cli.paths import check_writable

        check_writable(output_paths(args.out, args.format)[0], "--out")
    df = runs(args.experiments, tracking_uri=args.uri)
    step_metrics = [m for m in metrics or [] if is_step_metric(m)]
    if step_metrics:
        df = add_step_means(df, step_metrics, args.uri)
    present = set(df["experiment"])
    empty = [(n, u) for n, u in df.attrs.get("tracking_uris", {}).items() if n not in present]
    if empty:
        raise ConfigError([Problem("EXPERIMENT", f"experiment {n!r} has no rcnn-lab runs in {u}; "
                                   "run `rcnn-lab run EXP.yaml` first") for n, u in empty])
    table = summary(df, metrics=metrics, group_by=args.group_by, baseline=args.baseline, confidence=args.confidence,
                    mde=args.mde)
    for line in mixed_environments(df):
        print(f"rcnn-lab report: warning: {line}", file=sys.stderr)
    fmt = args.format or "md"
    out = args.out
    if out is None and args.gallery:  # the grid is a picture: it needs a folder
        out = str(Path("reports") / df["experiment"].iloc[0])
        print(f"note: --gallery writes PNGs; no --out given, writing to {out}/", file=sys.stderr)
    if out:
        path, stem, fmt = output_paths(out, args.format)
    from rcnn_lab.report.search import parent_runs, studies

    searched = studies(args.experiments, args.uri)
    tables, extra_plots = analysis(args, df, stem if out else None, searched)
    text = render(table, fmt)
    if fmt == "md":
        text += "".join(f"\n{heading}\n\n{markdown(frame.map(_fmt))}\n" for heading, frame in tables.items())
    print(text, end="")
    if not out:
        return 0

    def echo(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        from rcnn_lab.cli.paths import write_failed

        raise write_failed(exc, path, "--out") from None
    plots = write_plots(table, df, stem, args.group_by, args.uri, args.cost) + extra_plots
    page = Path(f"{stem}.html")
    page.write_text(html_report(table, [(plot_heading(p, stem), p) for p in plots], tables))
    files = list(dict.fromkeys([path, page, *plots]))
    echo(f"wrote {path}, {page.name} (plots embedded) and {len(plots)} plot(s): {', '.join(p.name for p in plots)}")
    if not args.no_log:
        log_to_sweeps(df, files, echo, parent_runs(searched))
    return 0


def plot_heading(path: Path, stem: Path) -> str:
    """The report page's heading of a plot written by ``write_plots`` / ``analysis`` (named ``<stem>_<what>.png``)."""
    what = Path(path).stem[len(Path(stem).name) + 1:] if Path(path).stem.startswith(Path(stem).name + "_") else Path(path).stem
    for prefix, heading in (("errors_", "COCO error breakdown, {}"), ("pr_", "Precision-recall at IoU 0.5 and 0.75, {}")):
        if what.startswith(prefix):
            return heading.format({"bbox": "boxes", "segm": "masks"}.get(what[len(prefix):], what[len(prefix):]))
    if what == "losses":
        return "Training losses per variant"
    if what == "gallery":
        return "Predictions per variant (each panel: ground truth | prediction)"
    if "_vs_" in what:
        metric, _, against = what.partition("_vs_")
        return f"{metric} against {against}"
    return f"{what} per variant: mean and confidence interval over seeds"


def _fmt(value):
    """Extra-table cells as text: floats with 3 decimals, NaN as '-'."""
    if isinstance(value, float):
        return "-" if value != value else f"{value:.3f}"
    return value
