"""Data-parallel training: rank-aware batches, DDP gradient averaging, sharded evaluation, --nproc end to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn_lab.data.loader import BatchSchedule, StreamSampler, build_loader
from rcnn_lab.data.shapes import shapes
from rcnn_lab.engine import distributed
from rcnn_lab.errors import ConfigError
from tests.runner.conftest import PAUSE_PLUGIN, PAUSE_TRANSFORM, cli_fd, paused_env

ROOT = Path(__file__).resolve().parents[2]


# --- the rank-aware sampler (no processes) ------------------------------------------------------

def test_ranks_split_every_global_batch_disjointly_and_resume():
    schedule = BatchSchedule(10, 4, shuffle=True, seed=3)
    whole = StreamSampler(schedule, infinite=True, start_iter=1)
    ranks = [StreamSampler(schedule, infinite=True, start_iter=1, rank=r, world_size=2) for r in range(2)]
    streams = [iter(whole)] + [iter(s) for s in ranks]
    for _ in range(7):  # crosses epochs (3 batches per epoch)
        batch, part0, part1 = (next(s) for s in streams)
        assert len(part0) == len(part1) == 2
        assert not set(part0) & set(part1)
        assert sorted(part0 + part1) == sorted(batch)


def test_global_batch_must_split_evenly():
    data = shapes(split="train", num_images=4, image_size=32)
    with pytest.raises(ConfigError, match="data.batch_size: 3 images per"):
        build_loader(data, 3, shuffle=True, infinite=True, rank=0, world_size=2)


def test_single_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    w, device = distributed.setup(torch.device("cpu"))
    assert (w.rank, w.size, w.main, w.active, device.type) == (0, 1, True, False, "cpu")
    model = nn.Linear(2, 2)
    assert distributed.wrap(model, device) is model
    assert distributed.eval_shard([1, 2, 3], 2) == [1, 2, 3]


# --- two gloo ranks (torch.multiprocessing) -------------------------------------------------------

class Tiny(nn.Module):
    """Conv -> frozen BN -> pooled linear: predicts the number of objects per image.

    BatchNorm is frozen on purpose: a training-mode ``nn.BatchNorm2d`` normalises with the
    statistics of the batch it sees, i.e. of each rank's half batch under DDP, so two ranks would
    not reproduce one process on the whole batch (Mask R-CNN configs that need N-independent
    results use ``model.backbone.norm: frozen_batchnorm`` or ``groupnorm`` for the same reason).
    ``unused`` never gets a gradient (as a plugin branch may not): DDP must cope with it.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.Linear(8, 1)
        self.unused = nn.Linear(8, 1)

    def forward(self, images):
        x = self.norm(self.conv(torch.stack(images))).relu().mean((2, 3))
        return self.head(x).squeeze(1)


def _steps(model, loader, steps: int) -> list[list[int]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen, stream = [], iter(loader)
    for _ in range(steps):
        images, targets = next(stream)
        counts = torch.tensor([float(len(t["boxes"])) for t in targets])
        loss = ((model(images) - counts) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append([int(t["image_id"]) for t in targets])
    return seen


class Oracle(nn.Module):
    """Detections derived from the ground truth (shifted boxes, every other label wrong): non-trivial COCO metrics."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = {float(dataset[i][0].sum()): dataset[i][1] for i in range(len(dataset))}

    def forward(self, images):
        outputs = []
        for image in images:
            t = self.truth[float(image.sum())]
            n = len(t["labels"])
            labels = t["labels"].clone()
            labels[::2] = labels[::2] % 5 + 1
            outputs.append({"boxes": t["boxes"] + torch.tensor([1.0, -1.0, 2.0, 0.0]), "labels": labels,
                            "scores": torch.linspace(0.9, 0.5, n), "masks": t["masks"][:, None].float()})
        return outputs


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    w, device = distributed.setup(torch.device("cpu"))
    result: dict = {"world": [w.rank, w.size]}
    train = shapes(split="train", num_images=8, image_size=32)
    model = Tiny()
    ddp = distributed.wrap(model, device)  # find_unused_parameters on (the default)
    loader = build_loader(train, 4, shuffle=True, seed=1, infinite=True, rank=w.rank, world_size=w.size)
    result["seen"] = _steps(ddp, loader, 2)
    torch.save(model.state_dict(), Path(out) / f"params{rank}.pt")

    val = shapes(split="val", num_images=5, image_size=32)
    loader = build_loader(distributed.eval_shard(val, 3), 2)
    ev = distributed.evaluate(Oracle(val), loader, val, device, max_images=3)
    result["metrics"] = {k: v for k, v in ev.metrics.items() if not k.startswith("eval_")}

    os.environ[distributed.FIND_UNUSED_ENV] = "0"
    try:
        again = build_loader(train, 4, shuffle=True, seed=1, infinite=True, rank=w.rank, world_size=w.size)
        _steps(distributed.wrap(Tiny(), device), again, 2)
        result["without_find_unused"] = "trained"
    except RuntimeError as exc:
        result["without_find_unused"] = str(exc)[:200]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    """2 ranks x 2 images == 1 process x 4 images: same parameters after 2 SGD steps, same COCO metrics."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [[0, 2], [1, 2]]

    train = shapes(split="train", num_images=8, image_size=32)
    single = Tiny()
    seen = _steps(single, build_loader(train, 4, shuffle=True, seed=1, infinite=True), 2)
    for step, ids in enumerate(seen):  # the ranks' halves are disjoint and make up the global batch
        halves = [r["seen"][step] for r in ranks]
        assert len(halves[0]) == len(halves[1]) == 2 and sorted(halves[0] + halves[1]) == sorted(ids)
    # gradients were averaged: both ranks hold the single-process parameters, to float32 rounding (sums in
    # another order: up to 2e-6 apart, measured with this process on 1, 2 and 4 threads); a wrong average
    # (the sum, or a rank's own half batch) moves a parameter tensor by 1e-2 or more
    for r in range(2):
        params = torch.load(tmp_path / f"params{r}.pt")
        for name, value in single.state_dict().items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(params["unused.weight"], Tiny().unused.weight)  # never updated, and DDP did not stop

    from rcnn_lab.engine.evaluate import evaluate

    val = shapes(split="val", num_images=5, image_size=32)
    expected = evaluate(Oracle(val), build_loader(val, 2), val, "cpu", max_images=3).metrics
    expected = {k: v for k, v in expected.items() if not k.startswith("eval_")}
    assert 0.05 < expected["bbox_AP50"] < 0.95 and 0.05 < expected["segm_AP"] < 0.95  # not trivially 0 or 1
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == pytest.approx(expected)

    # without find_unused_parameters, the parameter that gets no gradient stops DDP at the next step
    assert all("parameters that were not used in producing loss" in r["without_find_unused"] for r in ranks)


# --- rcnn-lab run --nproc 2, end to end ------------------------------------------------------------

EXPERIMENT = """
base: {base}
plugins: ['{pause_plugin}']  # a run that stops after its first checkpoint until Ctrl-C, where the test says so
name: ddp_tiny
model:
  num_classes: 6
  transform: {{min_size: 64, max_size: 64}}
  backbone: {{type: resnet_fpn, depth: 18, returned_layers: [2, 3, 4], out_channels: 64}}  # as tests/conftest.py TINY_MODEL
  anchor_generator: {{type: grid, sizes: [[16], [32], [64], [128]], aspect_ratios: [[1.0]]}}
  rpn:
    pre_nms_top_n: {{train: 100, test: 50}}
    post_nms_top_n: {{train: 50, test: 25}}
    batch_size_per_image: 64
  roi_heads:
    box_head: {{type: two_mlp, representation_size: 64}}
    mask_head: {{type: conv_stack, layers: [32], dilation: 1}}
    mask_predictor: {{type: mask_rcnn, dim_reduced: 32}}
    batch_size_per_image: 32
    detections_per_img: 20
data:
  train: {{type: shapes, split: train, num_images: 8, image_size: 64}}
  val: {{type: shapes, split: val, num_images: 4, image_size: 64}}
  batch_size: 2
  transforms: [{{type: hflip, p: 0.5}}, {pause_transform}]
train:
  iterations: 4
  device: cpu
  log_every: 1
  checkpoint_every: 2
  lr_scheduler: {{type: multistep, milestones: [0.75], warmup_iters: 0}}
eval:
  batch_size: 2
"""


@pytest.mark.slow
def test_nproc_2_one_run_logged_once_and_resumes(tmp_path, monkeypatch, capfd, new_store, warm):
    from mlflow import MlflowClient

    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENT.format(base=ROOT / "experiments" / "base.yaml", pause_plugin=PAUSE_PLUGIN,
                                     pause_transform=PAUSE_TRANSFORM))
    uri = new_store(tmp_path, "runs/mlflow.db")
    cmd = [sys.executable, "-m", "rcnn_lab", "run", str(exp), "--nproc", "2", "--set", f"tracking.uri={uri}", "--no-progress"]
    env = {**os.environ, "RCNN_LAB_RUNS": str(tmp_path / "runs")}
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:  # each rank loads 1 image per iteration; both stop after the checkpoint of 2
        first = warm.popen(cmd, cwd=tmp_path, env=paused_env(env, 2, batch_size=1), stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
        checkpoints = tmp_path / "runs" / "outputs" / "ddp_tiny"
        deadline = time.time() + 240
        while not list(checkpoints.glob("*/checkpoints/iter_*.pt")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C after the first checkpoint
        first.wait(timeout=120)
    text = first_log.read_text()
    run_id = text.split(" as run ")[1].split()[0]

    started_ms = int(time.time() * 1000)
    monkeypatch.chdir(tmp_path)  # the rerun's launcher is this process; its ranks write to its stdout
    monkeypatch.setenv("RCNN_LAB_RUNS", env["RCNN_LAB_RUNS"])
    code, out, err = cli_fd(capfd, *cmd[3:])
    assert code == 0, out + err
    assert f"into run {run_id}" in out  # resumed into the same run

    c = MlflowClient(uri)
    exp_id = c.get_experiment_by_name("ddp_tiny").experiment_id
    runs = c.search_runs([exp_id], filter_string="tags.`rcnn_lab.kind` = 'variant'")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]  # one run, not one per rank
    assert runs[0].data.tags["rcnn_lab.world_size"] == "2"
    history = c.get_metric_history(run_id, "loss")
    for part in ([m.step for m in history if m.timestamp < started_ms], [m.step for m in history if m.timestamp >= started_ms]):
        assert len(part) == len(set(part))  # within each invocation, rank 0 alone logged each step
    assert {m.step for m in history} == set(range(1, 5))
    assert len(c.get_metric_history(run_id, "final/bbox_AP")) == 1
    assert list((checkpoints / next(checkpoints.iterdir()).name / "checkpoints").glob("*.pt"))[0].name == "iter_0000004.pt"
