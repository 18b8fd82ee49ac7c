"""``rcnn-lab run`` argument handling (no training) and ``rcnn-lab ui``'s command line."""

from __future__ import annotations

import os
import re
import sys

import pytest

from tests.runner.conftest import cli, files_under, tiny_experiment


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RCNN_LAB_RUNS", raising=False)


@pytest.fixture
def execv(monkeypatch):
    """Record what ``rcnn-lab ui`` would exec instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, list(argv))))
    return calls


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_ui_serves_the_default_store_on_localhost(tmp_path, execv):
    code, out, _ = cli("ui", "--port", "5123")
    assert code == 0 and len(execv) == 1
    path, argv = execv[0]
    assert path == sys.executable and argv[1:4] == ["-m", "mlflow", "ui"]
    assert _opt(argv, "--host") == "127.0.0.1" and _opt(argv, "--port") == "5123"
    assert _opt(argv, "--backend-store-uri") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert _opt(argv, "--default-artifact-root") == (tmp_path / "runs" / "artifacts").as_uri()
    assert "open http://127.0.0.1:5123/#/experiments?workflowType=machine_learning" in out  # MLflow's model-training view


def test_ui_uses_the_experiments_store_or_the_environments(tmp_path, execv, monkeypatch, new_store):
    db = tmp_path / "store" / "mlflow.db"
    exp = tiny_experiment(tmp_path, f"sqlite:///{db}")
    assert cli("ui", str(exp))[0] == 0  # no store yet: the experiment list (and no store created)
    assert not db.exists()
    from rcnn_lab.runner.tracking import client, experiment_id

    new_store(tmp_path)  # the store the experiment names (store/mlflow.db), copied empty
    exp_id = experiment_id(client(f"sqlite:///{db}"), "tiny", None)
    code, out, _ = cli("ui", str(exp))
    assert f"/#/experiments/{exp_id}?workflowType=machine_learning" in out  # opens on that experiment's runs
    argv = execv[-1][1]
    assert _opt(argv, "--backend-store-uri") == f"sqlite:///{db}"
    assert _opt(argv, "--default-artifact-root") == (tmp_path / "store" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert cli("ui")[0] == 0
    assert _opt(execv[-1][1], "--backend-store-uri") == f"sqlite:///{tmp_path / 'env.db'}"


def test_ui_on_a_server_store_points_at_the_server(execv):
    code, out, _ = cli("ui", "--uri", "http://127.0.0.1:5999")
    assert code == 0 and execv == [] and "open http://127.0.0.1:5999/#/experiments?workflowType=machine_learning" in out


def test_dry_run_expands_seeds_with_a_hash_per_variant_and_seed(tmp_path):
    exp = tiny_experiment(tmp_path, None, variants="  b: {}\n  wide: {model.roi_heads.box_head.representation_size: 128}\n")
    code, out, _ = cli("run", str(exp), "--seeds", "0,1", "--dry-run")
    assert code == 0
    rows = re.findall(r"^\s+(\w+)\s+(\w+)\s+seed=(\d+)\s+([0-9a-f]{16})$", out, re.M)
    assert [(a, v, s) for a, v, s, _ in rows] == [("run", "b", "0"), ("run", "b", "1"), ("run", "wide", "0"), ("run", "wide", "1")]
    assert len({h for *_, h in rows}) == 4
    code, out2, _ = cli("run", str(exp), "--seeds", "1", "--only", "wide", "--dry-run")
    assert re.findall(r"[0-9a-f]{16}$", out2, re.M) == [rows[3][3]]  # same config, same hash
    assert files_under(tmp_path) == {"exp.yaml"}


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["--only", "bb"], "no variant 'bb'"),
    (["--set", "train.iterationz=3"], "did you mean 'iterations'"),
    (["--device", "tpu"], "error: --device: train.device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--set", "train.device=tpu"], "error: --set: train.device: expected auto"),
    # found by the dataset after loading, still attributed to where the key was set
    (["--set", "data.train.min_objects=7"], "error: exp.yaml: data.train.max_objects: must be between min_objects (7)"),
    (["--set", "model.num_classes=3"], "error: --set: model.num_classes: is 3 but data.train has 5 categories"),
    (["--set", "model.roi_heads.mask_head.norm=groupnorm", "--set", "model.roi_heads.mask_head.layers=[48]"],
     "model.roi_heads.mask_head.layers: norm groupnorm uses 32 groups"),
    (["--set", "model.backbone.fpn_norm=groupnorm", "--set", "model.backbone.out_channels=48"], "model.backbone.out_channels: norm groupnorm"),
    # found at load by the meta-device check, which gives resnet_fpn its weights but downloads nothing
    (["--set", "model.backbone.blocks=[1, 1, 1, 1]", "--set", "model.backbone.weights=imagenet"],
     "error: --set: model.backbone.blocks: [1, 1, 1, 1] does not fit resnet18's weights ([2, 2, 2, 2]); drop blocks or set weights: null"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, args, words):
    exp = tiny_experiment(tmp_path, None)
    code, out, err = cli("run", str(exp), *args)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert files_under(tmp_path) == {"exp.yaml"}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_flag_problem_found_at_preflight_names_the_flag(tmp_path):
    exp = tiny_experiment(tmp_path, None)
    code, _, err = cli("run", str(exp), "--device", "cuda")
    assert code == 2 and err.strip() == "rcnn-lab run: error: --device: train.device: cuda requested but CUDA is not available; use auto or cpu"
    assert files_under(tmp_path) == {"exp.yaml"}


def test_imagenet_weights_offline_fail_before_anything_is_written(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torch

    from tests.conftest import EXPERIMENTS

    def offline(url, *args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, out, err = cli("run", str(EXPERIMENTS / "coco_r50_fpn_torchvision.yaml"),
                         "--set", "data.train={type: shapes, num_images: 2, image_size: 32}",
                         "--set", "data.val={type: shapes, split: val, num_images: 2, image_size: 32}")
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1, err
    assert "coco_r50_fpn_torchvision.yaml: model.backbone.weights: could not download" in errors[0]
    assert "set weights: /path/to/resnet50-0676ba61.pth" in errors[0]
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch_home"]  # no runs/, no MLflow store
