"""``rcnn-lab run`` end to end on a sqlite store in tmp: runs, params, tags, metrics, artifacts, skip, force, failures."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from types import SimpleNamespace

import pytest
import yaml

from rcnn_lab.engine import checkpoint as ckpt
from rcnn_lab.engine.preflight import load_experiment
from rcnn_lab.runner.plan import make_plan
from tests.runner.conftest import cli, files_under, in_folder, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VARIANTS = """  b: {}
  small_rpn: {model.rpn.pre_nms_top_n.train: 80, eval.gallery: 2}
  bad: {train.optimizer.lr: 1.0e+12}
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, new_store):
    """dry-run, run ``b,small_rpn`` (exit 0), then the whole experiment (both skipped, ``bad`` fails), dry-run again."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("sweep")
    store = root / "store"
    with in_folder(root):
        exp_file = tiny_experiment(root, f"sqlite:///{store / 'mlflow.db'}", variants=VARIANTS, train="  eval_every: 1\n")
        s = SimpleNamespace(root=root, store=store, exp_file=exp_file)
        s.dry_before = cli("run", str(exp_file), "--dry-run")
        s.files_after_dry_run = files_under(root)
        new_store(root)  # an empty store at store/mlflow.db (a copy: faster than building one)
        s.first = cli("run", str(exp_file), "--only", "b,small_rpn", "--no-progress", "--set", "tracking.log_checkpoint=true")
        s.second = cli("run", str(exp_file), "--no-progress")
        s.files_before_dry_run = files_under(root)
        s.db_bytes = (store / "mlflow.db").read_bytes()
        s.dry_after = cli("run", str(exp_file), "--dry-run")
    s.plan = {r.variant.name: r for r in make_plan(load_experiment(exp_file))}
    s.client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    s.exp_id = s.client.get_experiment_by_name("tiny").experiment_id
    return s


def runs(s, kind: str, **tags) -> list:
    query = " and ".join([f"tags.`rcnn_lab.kind` = '{kind}'"] + [f"tags.`rcnn_lab.{k}` = '{v}'" for k, v in tags.items()])
    return s.client.search_runs([s.exp_id], query, order_by=["attributes.start_time ASC"])


def test_first_run_logs_one_sweep_run_and_a_run_per_variant_grouped_by_it_not_nested(sweep):
    code, out, err = sweep.first
    assert code == 0, err
    parent_id = runs(sweep, "variant", variant="b")[0].data.tags["rcnn_lab.sweep"]
    parent = sweep.client.get_run(parent_id)
    assert parent.data.tags["rcnn_lab.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert parent_id in out  # "tracked in ...: sweep run ID"
    children = [r for r in runs(sweep, "variant") if r.data.tags["rcnn_lab.sweep"] == parent_id]
    assert sorted(r.data.tags["rcnn_lab.variant"] for r in children) == ["b", "small_rpn"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert not any("mlflow.parentRunId" in r.data.tags for r in children)  # flat: the UI lists every run at once
    # names that say what a run is: the experiment, its variants and seeds; a variant, its seed and experiment
    assert parent.info.run_name == "tiny: b, small_rpn x seed 0"
    assert sorted(r.info.run_name for r in children) == ["b s0 (tiny)", "small_rpn s0 (tiny)"]
    # summary table: one row per variant x seed with status and key metrics
    table = out[out.index("variant  "):].splitlines()
    assert table[0].split()[:4] == ["variant", "seed", "status", "bbox_AP"] and "duration" in table[0]
    assert [row.split()[:3] for row in table[1:3]] == [["b", "0", "FINISHED"], ["small_rpn", "0", "FINISHED"]]
    assert "INFO mlflow" not in err + out  # MLflow's chatter is silenced


def test_params_are_the_flattened_resolved_config_and_tags_identify_the_run(sweep):
    import torch
    import torchvision

    import rcnn_lab

    for name, top_n, baseline in (("b", "100", "true"), ("small_rpn", "80", "false")):
        (r,) = runs(sweep, "variant", variant=name)
        p, t = r.data.params, r.data.tags
        assert p["model.rpn.pre_nms_top_n.train"] == top_n and p["model.backbone.depth"] == "18"
        assert p["train.optimizer.type"] == "sgd" and p["data.train.num_images"] == "8"
        assert t["rcnn_lab.seed"] == "0" and t["rcnn_lab.baseline"] == baseline
        assert t["rcnn_lab.config_hash"] == sweep.plan[name].hash
        assert t["rcnn_lab.device"] == "cpu"
        assert t["rcnn_lab.threads"] == "1"  # the module's _one_thread fixture
        assert (t["rcnn_lab.version"], t["rcnn_lab.torch"], t["rcnn_lab.torchvision"]) == (
            rcnn_lab.__version__, torch.__version__, torchvision.__version__)
        assert re.fullmatch(r"[0-9a-f]{40}", t["rcnn_lab.git_commit"]) and t["rcnn_lab.git_dirty"] in ("true", "false")


def test_metrics_per_step_per_eval_and_final(sweep):
    (r,) = runs(sweep, "variant", variant="small_rpn")
    c, rid = sweep.client, r.info.run_id
    for key in ("loss", "loss_classifier", "loss_mask", "loss_objectness", "lr", "images_per_s"):
        assert [m.step for m in c.get_metric_history(rid, key)] == [1, 2], key
    assert all(m.value > 0 for m in c.get_metric_history(rid, "loss"))
    assert [m.step for m in c.get_metric_history(rid, "bbox_AP")] == [1, 2]  # eval_every: 1, then the final eval
    final = c.get_metric_history(rid, "final/segm_AP")
    assert len(final) == 1 and final[0].step == 2 and final[0].value == c.get_metric_history(rid, "segm_AP")[-1].value
    assert 0 <= r.data.metrics["final/bbox_AP"] <= 1


def test_artifacts_config_summary_per_class_and_loss_curve(sweep, tmp_path):
    (r,) = runs(sweep, "variant", variant="small_rpn")
    c, rid = sweep.client, r.info.run_id
    assert {"config.yaml", "model_summary.txt", "loss_curve.png", "eval"} <= {a.path for a in c.list_artifacts(rid)}
    local = tmp_path / "dl"
    c.download_artifacts(rid, "", str(local))
    config = yaml.safe_load((local / "config.yaml").read_text())
    assert config["model"]["rpn"]["pre_nms_top_n"]["train"] == 80 and config["train"]["iterations"] == 2
    assert "parameters:" in (local / "model_summary.txt").read_text()
    per_class = json.loads((local / "eval" / "per_class.json").read_text())
    classes = ["circle", "square", "triangle", "ellipse", "star"]
    assert list(per_class) == ["bbox", "segm"] and all(list(per_class[k]) == classes for k in per_class)
    assert (local / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # tracking.log_checkpoint (opt-in, here with --set: tracking is the same for every variant) logs the final checkpoint
    last = ckpt.path_for("checkpoint", sweep.plan["small_rpn"].config.train.iterations)  # the final checkpoint
    assert [a.path for a in c.list_artifacts(rid, "checkpoint")] == [last.as_posix()]
    # artifacts and outputs sit next to the sqlite store, not in the current folder
    assert r.info.artifact_uri.startswith((sweep.store / "artifacts").as_uri())
    assert (sweep.store / "outputs" / "tiny").is_dir() and not (sweep.root / "runs").exists()
    assert not (sweep.root / "mlflow.db").exists()  # nothing falls back to MLflow's default store in the cwd


def test_gallery_saved_detections_cost_metrics_dataset_inputs_and_experiment_kind(sweep, tmp_path):
    from rcnn_lab.engine import eval_file
    from rcnn_lab.engine.gallery import gallery_indices

    (r,) = runs(sweep, "variant", variant="small_rpn")
    c, rid = sweep.client, r.info.run_id
    # the gallery: the same 2 fixed validation images at each evaluation (steps 1 and 2), final panels as gallery/<id>.png
    ids = [i + 1 for i in gallery_indices(4, 2)]  # shapes image id = index + 1
    assert ids == [1, 4]
    images = [a.path.rsplit("/", 1)[-1] for a in c.list_artifacts(rid, "images")]
    logged = {(m.group(1), int(m.group(2))) for m in (re.match(r"gallery~(\d+)\+step\+(\d+)\+", n) for n in images) if m}
    assert logged == {(str(i), step) for i in ids for step in (1, 2)}
    assert sorted(a.path for a in c.list_artifacts(rid, "gallery")) == [f"gallery/{i}.png" for i in ids]
    (b,) = runs(sweep, "variant", variant="b")
    assert c.list_artifacts(b.info.run_id, "gallery") == []  # eval.gallery defaults to 0
    # the saved eval file: every scored detection and the GT of the 4 validation images
    data = eval_file.read(c.download_artifacts(rid, eval_file.ARTIFACT, str(tmp_path)))
    assert data["iteration"] == 2 and data["image_ids"] == [1, 2, 3, 4] and data["iou_types"] == ["bbox", "segm"]
    assert sorted({im["id"] for im in data["ground_truth"]["images"]}) == [1, 2, 3, 4]
    assert all(set(res) >= {"image_id", "category_id", "bbox", "score", "segmentation"} for res in data["results"])
    # cost next to accuracy
    m = r.data.metrics
    assert m["final/params"] > 1e6 and m["final/gflops"] > 0 and m["final/peak_memory_mb"] > 0
    assert m["final/images_per_s"] == pytest.approx(2 * 2 / m["final/train_time_s"])
    # datasets as run inputs, and the experiment opens on MLflow's model-training view
    inputs = {d.tags[0].value: d.dataset for d in c.get_run(rid).inputs.dataset_inputs}
    assert inputs["training"].name == "shapes/train" and inputs["validation"].name == "shapes/val"
    assert json.loads(inputs["validation"].profile) == {"images": 4, "categories": 5,
                                                        "annotations": len(data["ground_truth"]["annotations"])}
    assert c.get_experiment(sweep.exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_sweep_run_carries_the_summary_and_each_gallery_run_shows_its_panels_on_its_page(sweep):
    c = sweep.client
    (b,), (small,) = runs(sweep, "variant", variant="b"), runs(sweep, "variant", variant="small_rpn")
    first = c.get_run(b.data.tags["rcnn_lab.sweep"])
    # per-variant metrics, named <metric>/<variant>: the runs table and charts show them on the sweep's row
    for child, name in ((b, "b"), (small, "small_rpn")):
        for m in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
            assert first.data.metrics[f"{m}/{name}"] == pytest.approx(child.data.metrics[f"final/{m}"])
    assert not any(k.endswith(("ci_low", "ci_high")) for k in first.data.metrics)  # one seed: no interval
    # the description (MLflow renders it as markdown on the run page): the report's table, updated as runs end
    note = first.data.tags["mlflow.note.content"]
    assert note.startswith("**tiny**: 2 of 2 runs finished")
    assert re.search(r"^\| b \(baseline\) +\|", note, re.M) and re.search(r"^\| small_rpn +\|", note, re.M)
    assert "Δ bbox_AP" in note and "p segm_AP" in note
    assert [m.step for m in c.get_metric_history(first.info.run_id, "bbox_AP/b")] == [1, 2]  # rewritten as each run ended
    assert not list((sweep.store / "outputs" / "tiny").glob("sweep-*"))  # its journal is stored: nothing left on disk
    # the second invocation: both skipped (their metrics found finished), bad failed: counted, not averaged
    second = next(r for r in runs(sweep, "sweep") if r.info.run_id != first.info.run_id)
    assert second.data.tags["mlflow.note.content"].startswith("**tiny**: 2 of 3 runs finished")
    assert second.data.metrics["segm_AP/small_rpn"] == pytest.approx(small.data.metrics["final/segm_AP"])
    assert not any(k.startswith(("bbox_AP/bad", "segm_AP/bad")) for k in second.data.metrics)
    # a gallery run's page opens on its final panels (one click from the run list), from MLflow's artifact address
    gallery = small.data.tags["mlflow.note.content"]
    for i in (1, 4):
        assert f"](get-artifact?path=gallery%2F{i}.png&run_uuid={small.info.run_id})" in gallery
    assert "mlflow.note.content" not in b.data.tags  # no gallery, no description
    # no -1 (COCOeval: no ground truth of that size) among the metrics; the heartbeat is a readable time
    assert all(v != -1 for r in (b, small) for v in r.data.metrics.values())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", b.data.tags["rcnn_lab.heartbeat"])


def test_command_line_keys_are_the_changes_set_with_set(tmp_path):
    from rcnn_lab.runner.sweep import command_line_keys
    from tests.runner.conftest import tiny_experiment

    exp_file = tiny_experiment(tmp_path, None, variants=VARIANTS)
    exp = load_experiment(exp_file, ["train.iterations=5", "data.val.num_images=3"], check_models=False)
    small = exp.variant("small_rpn")
    assert small.changed["model.rpn.pre_nms_top_n.train"] == 80 and small.changed["train.iterations"] == 5
    assert command_line_keys(small) == {"train.iterations": 5, "data.val.num_images": 3}


def test_rerun_skips_finished_and_a_failing_variant_is_recorded_while_the_sweep_goes_on(sweep, tmp_path):
    code, out, err = sweep.second
    assert code == 1
    assert re.search(r"skip\s+b seed=0", out) and re.search(r"skip\s+small_rpn seed=0", out)
    assert len(runs(sweep, "variant", variant="b")) == 1 and len(runs(sweep, "variant", variant="small_rpn")) == 1
    (bad,) = runs(sweep, "variant", variant="bad")
    assert bad.info.status == "FAILED"
    error = bad.data.tags["rcnn_lab.error"]
    assert error.startswith("TrainingError: non-finite loss") and "\n" not in error
    trace = sweep.client.download_artifacts(bad.info.run_id, "error.txt", str(tmp_path))
    assert "Traceback" in open(trace).read() and "non-finite loss" in open(trace).read()
    assert sweep.client.get_run(bad.data.tags["rcnn_lab.sweep"]).info.status == "FAILED"
    rows = {row.split()[0]: row.split()[2] for row in out[out.index("variant  "):].splitlines()[1:4]}
    assert rows == {"b": "SKIPPED", "small_rpn": "SKIPPED", "bad": "FAILED"}


def test_dry_run_prints_the_plan_and_writes_nothing(sweep):
    code, out, _ = sweep.dry_before
    assert code == 0
    assert sweep.files_after_dry_run == {"exp.yaml"}  # no store, no outputs, no artifacts
    for name in ("b", "small_rpn", "bad"):
        assert re.search(rf"run\s+{name}\s+seed=0\s+{sweep.plan[name].hash}", out)
    code, out, _ = sweep.dry_after  # after the runs: finished ones would be skipped, the failed one rerun
    assert code == 0
    assert re.search(rf"skip\s+b\s+seed=0\s+{sweep.plan['b'].hash}", out)
    assert re.search(rf"run\s+bad\s+seed=0\s+{sweep.plan['bad'].hash}", out)
    assert files_under(sweep.root) == sweep.files_before_dry_run
    assert (sweep.store / "mlflow.db").read_bytes() == sweep.db_bytes


def test_force_reruns_a_finished_config_as_a_new_run(sweep):
    code, out, err = cli("run", str(sweep.exp_file), "--only", "b", "--force", "--no-progress")
    assert code == 0, err
    b_runs = runs(sweep, "variant", variant="b")
    assert len(b_runs) == 2 and all(r.info.status == "FINISHED" for r in b_runs)
    assert b_runs[0].info.run_id != b_runs[1].info.run_id
    assert b_runs[1].data.tags["rcnn_lab.config_hash"] == b_runs[0].data.tags["rcnn_lab.config_hash"]


def test_unreachable_server_fails_before_training_with_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as closed:  # bound, not listening: refused for the whole test, and no other process takes it
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        exp = tiny_experiment(tmp_path / "e", url)
        code, out, err = cli("run", str(exp), "--no-progress")
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"tracking store {url} is unreachable (connection refused)" in lines[0]
    assert "run " not in out  # nothing started
    assert files_under(tmp_path) == {"e", "e/exp.yaml"}


def test_bad_input_found_by_preflight_exits_2_before_any_store_exists(tmp_path):
    exp = tiny_experiment(tmp_path, f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    code, _, err = cli("run", str(exp), "--set", "model.num_classes=4", "--no-progress")
    assert code == 2
    assert "model.num_classes: is 4 but data.train has 5 categories" in err
    assert files_under(tmp_path) == {"exp.yaml"}


def test_a_store_down_until_the_end_loses_nothing_and_the_rerun_stores_it_without_retraining(tmp_path, new_store,
                                                                                            monkeypatch):
    """The tracking store stops answering before the first write and is still down when training ends:
    training finishes, the command ends with one line (exit 3) and keeps the writes on disk; once the
    store answers, the same command stores them, the run is FINISHED and nothing is retrained."""
    import threading

    import requests
    from mlflow import MlflowClient

    from rcnn_lab.runner import journal
    from rcnn_lab.runner import sweep as runner_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RCNN_LAB_RUNS", raising=False)
    uri = new_store(tmp_path)
    exp = tiny_experiment(tmp_path / "e", uri, iterations=4, train="  checkpoint_every: 2\n")
    down, real_ship = threading.Event(), journal.ship

    def ship(c, run_id, entry):  # every write after the run's creation meets a dead store
        if down.is_set():
            raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='tracking'): Connection refused")
        return real_ship(c, run_id, entry)

    monkeypatch.setattr(journal, "ship", ship)
    monkeypatch.setattr(journal, "RETRY_S", 0.05)
    monkeypatch.setattr(runner_sweep, "OUTAGE_WAIT_S", 0.5)
    down.set()
    code, out, err = cli("run", str(exp), "--no-progress")
    assert code == 3 and "Traceback" not in out + err
    assert not [line for line in err.splitlines() if "tracking store" in line or "Retrying" in line]  # stdout only
    lines = out.splitlines()
    notice = [i for i, line in enumerate(lines) if "is not answering since" in line]
    closing = [i for i, line in enumerate(lines) if line.startswith("tracking store") and "unreachable since" in line]
    assert len(notice) == 1 and len(closing) == 1 and notice[0] < closing[0]  # said at once, once
    said, closed = lines[notice[0]], lines[closing[0]]
    assert "(connection refused): training goes on" in said and "waits up to 0 s" in said and "rerun" in said
    since = re.search(r"since (\d\d:\d\d:\d\d)", said).group(1)
    assert f"unreachable since {since} (connection refused)" in closed  # the first failed write, both times
    assert "not stored for 2 run(s)" in closed and "its end (FINISHED)" in closed  # the run and the sweep's summary
    assert f"rcnn-lab run {exp}" in closed
    table = lines[lines.index(next(line for line in lines if line.startswith("variant"))) + 1]
    assert table.split()[:5] == ["b", "0", "finished,", "not", "yet"]  # "finished, not yet stored": MLflow says RUNNING
    c = MlflowClient(uri)
    exp_id = c.get_experiment_by_name("tiny").experiment_id
    (run,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'variant'")
    assert run.info.status == "RUNNING" and c.get_metric_history(run.info.run_id, "loss") == []
    (sweep_run,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'sweep'")
    assert sweep_run.info.status == "RUNNING" and run.data.tags["rcnn_lab.sweep"] == sweep_run.info.run_id
    kept_summary = tmp_path / "store" / "outputs" / "tiny" / f"sweep-{sweep_run.info.run_id}" / "tracking" / "journal.jsonl"
    assert kept_summary.is_file()  # the sweep's summary waits on disk too
    outputs = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "outputs").rglob("*") if p.is_file()}
    assert any(ckpt.folder(p.parent.parent) == p.parent for p in outputs)  # the checkpoints are there

    gone = subprocess.Popen(["true"])
    gone.wait()
    c.set_tag(sweep_run.info.run_id, "rcnn_lab.pid", str(gone.pid))  # the first command's process has ended (here: in-process)
    down.clear()
    code, out, err = cli("run", str(exp), "--no-progress")
    assert code == 0, err
    assert re.search(r"stored b seed=0: \d+ metric points, \d+ files, .*its end \(FINISHED\)", out)
    assert re.search(r"skip\s+b seed=0", out) and not re.search(r"^run\s", out, re.M)  # nothing retrained
    run = c.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "final/bbox_AP" in run.data.metrics
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert {a.path for a in c.list_artifacts(run.info.run_id, "eval")} >= {"eval/metrics.json", "eval/per_class.json"}
    # the rerun continues the same sweep run (not KILLED, no second one) and stores its summary
    assert f"continue sweep run {sweep_run.info.run_id}" in out and "marked KILLED" not in out
    (again,) = c.search_runs([exp_id], "tags.`rcnn_lab.kind` = 'sweep'")
    assert again.info.run_id == sweep_run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["mlflow.note.content"].startswith("**tiny**: 1 of 1 runs finished")
    assert again.data.metrics["segm_AP/b"] == pytest.approx(run.data.metrics["final/segm_AP"])
    assert not kept_summary.parent.parent.exists()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "outputs").rglob("*") if p.is_file()}
    assert {p: t for p, t in kept.items() if p in outputs and "tracking" not in p.parts} == \
        {p: t for p, t in outputs.items() if "tracking" not in p.parts}  # checkpoints kept, untouched


def test_a_store_that_stops_answering_between_two_runs_ends_the_sweep_with_one_line(tmp_path, new_store, monkeypatch):
    import requests
    from mlflow import MlflowClient

    from rcnn_lab.runner import sweep as runner_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RCNN_LAB_RUNS", raising=False)
    uri = new_store(tmp_path)
    exp = tiny_experiment(tmp_path / "e", uri, iterations=1, variants="  b: {}\n  c: {train.optimizer.lr: 0.02}\n")
    real_decide, calls = runner_sweep.decide, []

    def decide(c, exp_id, run, force):
        calls.append(run.variant.name)
        if len(calls) == 2:
            raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='tracking'): Connection refused")
        return real_decide(c, exp_id, run, force)

    monkeypatch.setattr(runner_sweep, "decide", decide)
    code, out, err = cli("run", str(exp), "--no-progress")
    assert code == 3 and calls == ["b", "c"] and "Traceback" not in out + err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert line.startswith("rcnn-lab run: error: tracking store") and "stopped answering (connection refused) before c seed=0" in line and "run the same command again" in line
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "tags.`rcnn_lab.kind` = 'variant'")
    assert run.data.tags["rcnn_lab.variant"] == "b" and run.info.status == "FINISHED"  # the first run is stored whole
    assert c.get_run(run.data.tags["rcnn_lab.sweep"]).info.status == "FAILED"  # the sweep did not finish
