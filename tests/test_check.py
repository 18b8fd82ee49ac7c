"""The start-up check for a torch/torchvision pair whose C++ ops do not load."""

from __future__ import annotations

import pytest
import torchvision

from rcnn_lab._check import BrokenInstallError, check_torchvision_ops
from rcnn_lab.cli.main import main
from tests.conftest import EXPERIMENTS


def test_matching_install_passes():
    check_torchvision_ops()  # this venv's pair works: no exception


def _broken_nms(*args, **kwargs):
    raise RuntimeError("operator torchvision::nms does not exist")


def test_mismatched_ops_give_cause_and_fix(monkeypatch):
    monkeypatch.setattr(torchvision.ops, "nms", _broken_nms)
    with pytest.raises(BrokenInstallError) as info:
        check_torchvision_ops()
    message = str(info.value)
    assert "\n" not in message
    assert "operator torchvision::nms does not exist" in message
    assert "fresh venv" in message and "+cpu" in message


def test_cli_exits_3_with_one_line_before_any_component_is_used(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torchvision.ops, "nms", _broken_nms)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(EXPERIMENTS / "quickstart.yaml")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rcnn-lab: error: torchvision")
    assert main(["export-shapes", "--out", "shapes", "--num-images", "1"]) == 3
    assert capsys.readouterr().err.startswith("rcnn-lab: error: torchvision")
    assert list(tmp_path.iterdir()) == []
