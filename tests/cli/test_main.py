"""The command table, and what answers without importing torch (``--help``, errors in the YAML itself)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rcnn_lab.cli.main import COMMANDS, build_parser, main
from tests.conftest import ROOT

# Runs ``main(argv)`` in a fresh interpreter; prints its exit code and whether torch got imported.
PROBE = """
import sys
from rcnn_lab.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("RESULT", code, "torch" in sys.modules, "torchvision" in sys.modules)
"""


def _fresh(*argv: str, cwd) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return result.split()[1:], proc.stderr


def test_every_command_is_registered_once_with_a_handler():
    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == names
    for command in COMMANDS:
        assert sub.choices[command.name].get_default("handler") is command.handler


@pytest.mark.parametrize("argv, code, words", [
    (["--help"], "0", ""),
    (["validate", "missing.yaml"], "2", "missing.yaml: file not found"),
    (["run", "bad.yaml"], "2", "bad.yaml: invalid YAML at line"),
    (["validate", "good.yaml", "--set", "model.rpn"], "2", "must look like dotted.key=value"),
    (["report", "--metric", ",", "some_experiment"], "2", "--metric: needs a metric name"),
    (["report", "good.yaml"], "2", "no tracking store at"),
])
def test_answers_without_importing_torch(tmp_path, argv, code, words):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    (tmp_path / "good.yaml").write_text(f"name: good\ntracking: {{uri: 'sqlite:///{tmp_path}/none.db'}}\n")
    result, err = _fresh(*argv, cwd=tmp_path)
    assert result == [code, "False", "False"], err
    assert words in err


def test_a_command_that_builds_models_still_runs(capsys):
    assert main(["validate", str(ROOT / "experiments" / "quickstart.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """``rcnn-lab run EXP --dry-run | head``: the closed pipe is no error, and no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "rcnn_lab", "run", str(ROOT / "experiments" / "anchors_ablation.yaml"),
                             "--dry-run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "RCNN_LAB_RUNS": str(tmp_path / "runs")})
    proc.stdout.close()  # the reader is gone before the plan is printed
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
