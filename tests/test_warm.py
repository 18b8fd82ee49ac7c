"""tests/warm.py: a warm ``python -m rcnn_lab`` is the process ``subprocess.Popen`` would have started.

A plugin of the experiment records, from inside the command, what the process was given; ``validate``
loads it as ``run`` would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no warm server here (tests/warm.py: Linux only)")

PROBE = '''
import atexit, json, os, signal, sys, time

import torch

out = os.environ["WARM_PROBE_OUT"]
state = {"cwd": os.getcwd(), "argv": sys.argv, "var": os.environ.get("WARM_PROBE_VAR"), "threads": torch.get_num_threads(),
         "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler, "pid": os.getpid(),
         "ppid": os.getppid(), "main": sys.modules["__main__"].__spec__.name, "stdin": sys.stdin.read()}
with open(out, "w") as f:
    json.dump(state, f)
atexit.register(lambda: open(out + ".atexit", "w").close())  # runs only if the interpreter ends as it should
if os.environ.get("WARM_PROBE_HANG"):
    time.sleep(600)
'''


def _experiment(folder):
    (folder / "probe.py").write_text(PROBE)
    (folder / "exp.yaml").write_text(f"base: {ROOT / 'experiments' / 'quickstart.yaml'}\nplugins: [probe.py]\n")
    return folder / "probe.json"


def test_the_child_gets_the_folder_environment_arguments_and_threads_it_is_given(warm, tmp_path):
    out = _experiment(tmp_path)
    env = {**os.environ, "WARM_PROBE_OUT": str(out), "WARM_PROBE_VAR": "given", "OMP_NUM_THREADS": "2"}
    proc = warm.popen([sys.executable, "-m", "rcnn_lab", "validate", "exp.yaml"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "exp.yaml: 1 variant(s) x 1 seed(s) valid" in output, output
    state = json.loads(out.read_text())
    assert state["cwd"] == str(tmp_path) and state["var"] == "given" and state["threads"] == 2
    assert state["argv"] == [str(ROOT / "rcnn_lab" / "__main__.py"), "validate", "exp.yaml"]  # as python -m sets it
    assert state["main"] == "rcnn_lab.__main__" and state["sigint"] and state["stdin"] == ""
    assert state["pid"] == proc.pid and state["ppid"] != os.getpid()  # forked by the server, not by this process
    assert out.with_name("probe.json.atexit").exists()  # ended as an interpreter ends


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)])
def test_a_signal_reaches_the_child_and_its_exit_status_comes_back(warm, tmp_path, sig, code):
    out = _experiment(tmp_path)
    env = {**os.environ, "WARM_PROBE_OUT": str(out), "WARM_PROBE_HANG": "1"}
    proc = warm.popen([sys.executable, "-m", "rcnn_lab", "validate", "exp.yaml"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    assert proc.poll() is None
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, output
    assert ("rcnn-lab validate: interrupted" in output) == (sig == signal.SIGINT)  # Ctrl-C as the command handles it


def test_code_runs_as_python_c_and_other_commands_are_refused(warm, tmp_path):
    code = "import os, sys; print(sys.argv, sys.path[0] == '', os.getcwd(), __name__, len(os.environ['BIG'])); sys.exit(3)"
    env = {**os.environ, "BIG": "x" * 300_000}  # a request the socket delivers in parts
    proc = warm.popen([sys.executable, "-c", code, "a"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    output, _ = proc.communicate(timeout=60)
    assert (proc.returncode, output) == (3, f"['-c', 'a'] True {tmp_path} __main__ 300000\n")
    with pytest.raises(ValueError, match="not \\[sys.executable"):
        warm.popen(["sleep", "1"])
