"""``--nproc N``'s launcher: a rendezvous store on 127.0.0.1 only, ranks as its clients, failures and signals."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcnn_lab.errors import ConfigError
from rcnn_lab.runner import launch, lifeline
from tests.conftest import sigint_as_in_a_terminal

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc (Linux)")

ROOT = Path(__file__).resolve().parents[2]

# a rank: joins the process group through env://, all-reduces, reports, then waits for the test
GLOO_RANK = """
import json, os, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
out = Path(sys.argv[1])
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
        "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCHELASTIC_USE_AGENT_STORE")
info = {"pid": os.getpid(), "sum": t.item(), "env": {k: os.environ.get(k) for k in keys}}
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(info))
while not (out / "go").exists():
    time.sleep(0.05)
dist.barrier()
dist.destroy_process_group()
"""

# a rank without torch: rank 1 fails (or is interrupted), rank 0 would sleep for minutes
PLAIN_RANK = """
import os, signal, sys, time
from pathlib import Path
out, mode, rank = Path(sys.argv[1]), sys.argv[2], os.environ["RANK"]
if mode == "deaf" and rank == "0":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:  # from the moment the test can see this rank, an interrupt is recorded
    (out / f"pid{rank}").write_text(str(os.getpid()))
    if rank == "1" and mode in ("fail", "deaf"):
        time.sleep(0.3)
        sys.exit(3)
    if rank == "1" and mode == "crash":
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
except KeyboardInterrupt:
    (out / f"interrupted{rank}").write_text("")
    sys.exit(130)
"""

# a rank of `python -m rcnn_lab` in small: asks for its launcher's death signal first, then reports and sleeps
ORPHAN_RANK = """
import os, signal, sys, time
from pathlib import Path
from rcnn_lab.runner.lifeline import die_with_launcher
die_with_launcher()
out, rank = Path(sys.argv[1]), os.environ["RANK"]
signal.signal(signal.SIGTERM, lambda signum, frame: ((out / f"term{rank}").write_text(""), sys.exit(143)))
(out / f"pid{rank}").write_text(str(os.getpid()))
time.sleep(60)
"""


def listening(pid: int) -> list[tuple[str, int]]:
    """The TCP sockets process ``pid`` listens on: (address, port)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            host, port = local.split(":")
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-endian
            found.append((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def wait_for(paths, proc=None, timeout=120):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert proc is None or proc.poll() is None, f"launcher ended early with {proc.returncode}"
        assert time.time() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody has reaped yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def gone_within(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(pid) for pid in pids)


def launcher(out: Path, *command: str) -> subprocess.Popen:
    """``launch(2, command)`` in its own process (as ``rcnn-lab run --nproc 2`` runs it)."""
    code = "import sys; from rcnn_lab.runner.launch import launch; sys.exit(launch(2, sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in launch.IFNAME_VARS:
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-c", code, *command], env=env, cwd=out, preexec_fn=sigint_as_in_a_terminal)


def test_store_listens_on_loopback_only_and_ranks_join_it_as_clients(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(GLOO_RANK)
    proc = launcher(tmp_path, sys.executable, str(script), str(tmp_path))
    try:
        wait_for([tmp_path / "rank0.json", tmp_path / "rank1.json"], proc)
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        port = int(ranks[0]["env"]["MASTER_PORT"])
        assert listening(proc.pid) == [("127.0.0.1", port)]  # the launcher's store, nothing else
        for r in ranks:
            sockets = listening(r["pid"])
            assert all(is_loopback(host) for host, _ in sockets), sockets  # gloo's peer sockets too
            assert port not in [p for _, p in sockets]  # a client of the store, not its server
        (tmp_path / "go").write_text("")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    loop = launch.loopback_interface()
    for rank, r in enumerate(ranks):
        assert r["sum"] == 3.0  # 1 + 2: both ranks are in one group
        assert r["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": r["env"]["OMP_NUM_THREADS"],
                            "GLOO_SOCKET_IFNAME": loop, "NCCL_SOCKET_IFNAME": loop, "TORCHELASTIC_USE_AGENT_STORE": "True"}


@pytest.mark.parametrize("mode, grace_s, code", [("fail", 30.0, 3), ("deaf", 1.0, 3), ("crash", 30.0, 128 + 9)])
def test_a_failing_rank_ends_the_others_and_its_code_is_returned(tmp_path, mode, grace_s, code):
    script = tmp_path / "rank.py"
    script.write_text(PLAIN_RANK)
    started = time.monotonic()
    assert launch.launch(2, [sys.executable, str(script), str(tmp_path), mode], grace_s=grace_s) == code
    assert time.monotonic() - started < 25  # rank 0 would sleep 60 s; "deaf" ignores SIGTERM and is killed
    pid0 = int((tmp_path / "pid0").read_text())
    assert not Path(f"/proc/{pid0}").exists()


def test_an_interrupt_reaches_every_rank_and_returns_130(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(PLAIN_RANK)
    proc = launcher(tmp_path, sys.executable, str(script), str(tmp_path), "wait")
    try:
        wait_for([tmp_path / "pid0", tmp_path / "pid1"], proc)
        proc.send_signal(signal.SIGINT)  # the launcher alone: it passes the signal on
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "interrupted0").exists() and (tmp_path / "interrupted1").exists()


def test_ranks_end_with_a_launcher_killed_by_sigkill(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(ORPHAN_RANK)
    proc = launcher(tmp_path, sys.executable, str(script), str(tmp_path))
    pids = []
    try:
        wait_for([tmp_path / "pid0", tmp_path / "pid1"], proc)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
        proc.kill()  # nothing to pass on: the kernel tells the ranks
        proc.wait(timeout=10)
        assert gone_within(pids, 5)
    finally:
        for pid in [p for p in pids if alive(p)]:
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "term0").exists() and (tmp_path / "term1").exists()  # SIGTERM: each rank's handler ran


def test_a_rank_whose_launcher_ended_before_it_started_exits_at_once(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(ORPHAN_RANK)
    # the "launcher" starts the rank (which waits 0.5 s, then becomes Python) and ends at once
    start = ("import os, subprocess, sys; env = {**os.environ, 'RANK': '0', sys.argv[1]: str(os.getpid())}; "
             "print(subprocess.Popen(['sh', '-c', 'sleep 0.5; exec \"$0\" \"$@\"', *sys.argv[2:]], env=env, stdout=subprocess.DEVNULL).pid)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", start, lifeline.LAUNCHER_PID_VAR, sys.executable, str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    rank = int(done.stdout)
    assert gone_within([rank], 30)  # rank_env's variable, and a parent that is not the launcher: SIGTERM to itself
    assert not (tmp_path / "pid0").exists()  # before anything else ran


def test_death_signal_is_a_no_op_outside_a_rank(monkeypatch):
    monkeypatch.delenv(lifeline.LAUNCHER_PID_VAR, raising=False)
    asked = []
    monkeypatch.setattr(lifeline, "set_parent_death_signal", asked.append)
    lifeline.die_with_launcher()
    monkeypatch.setenv(lifeline.LAUNCHER_PID_VAR, "not-a-pid")  # set by hand: ignored, and no crash at start-up
    lifeline.die_with_launcher()
    assert asked == [] and lifeline.LAUNCHER_PID_VAR not in os.environ


def test_importing_lifeline_imports_no_torch():
    """``python -m rcnn_lab`` imports lifeline before anything else, to ask for the death signal at once."""
    code = "import sys, rcnn_lab.runner.lifeline; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_rank_environment_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(launch, "cores", lambda: 8)
    env = launch.rank_env({"PATH": "/bin", "WORLD_SIZE": "9"}, 1, 2, 12345)
    loop = launch.loopback_interface()
    assert env["PATH"] == "/bin" and env["WORLD_SIZE"] == "2" and env["RANK"] == env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "12345" and env["OMP_NUM_THREADS"] == "4"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == loop
    assert env[lifeline.LAUNCHER_PID_VAR] == str(os.getpid())  # the process that starts the ranks
    user = launch.rank_env({"GLOO_SOCKET_IFNAME": "eth7", "NCCL_SOCKET_IFNAME": "ib0", "OMP_NUM_THREADS": "3"}, 0, 2, 1)
    assert (user["GLOO_SOCKET_IFNAME"], user["NCCL_SOCKET_IFNAME"], user["OMP_NUM_THREADS"]) == ("eth7", "ib0", "3")


def test_loopback_interface_is_the_one_holding_127_0_0_1():
    names = [name for _, name in socket.if_nameindex()]
    loop = launch.loopback_interface()
    assert loop in names
    assert launch._ipv4_address(loop) == "127.0.0.1"


def test_nproc_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="already running under torchrun; drop --nproc"):
        launch.launch_local(2, ["run", "e.yaml", "--nproc", "2"])
