"""``rcnn-lab run --nproc N``: N local DDP ranks whose rendezvous listens on the loopback interface only.

torchrun's rendezvous store (a c10d ``TCPStore``) listens on every interface of the machine, and
torch offers no option to bind it elsewhere. This launcher replaces torchrun for one machine:

* It binds a socket to ``127.0.0.1`` (the OS picks a free port) and hosts the ``TCPStore`` on that
  socket itself (``master_listen_fd``), for as long as any rank runs.
* It starts the N ranks with torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` ...) and ``TORCHELASTIC_USE_AGENT_STORE=True``, so
  torch's ``env://`` rendezvous makes every rank, rank 0 included, a client of the launcher's
  store rather than a server (``torch.distributed.rendezvous._create_c10d_store``).
* ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` default to the loopback interface, so the
  sockets the ranks open to each other listen there too (a value the user set is kept).
* A rank that fails ends the others (SIGTERM, then SIGKILL after :data:`GRACE_S`) and its exit
  code is returned. SIGINT / SIGTERM to the launcher is passed on to the ranks (which record the
  run KILLED, see ``rcnn_lab.runner.parallel.join``); the launcher then returns 130.
* A launcher that cannot pass anything on (SIGKILL, the OOM killer) still takes its ranks with it
  on Linux: each rank asks the kernel for SIGTERM when the launcher ends (``rcnn_lab.runner.lifeline``).

Runs over several machines use torchrun directly (docs/cluster.md): the rendezvous must then be
reachable from the other machines, which is the user's network choice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

from rcnn_lab.engine import distributed
from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.runner.lifeline import LAUNCHER_PID_VAR
from rcnn_lab.runner.parallel import cores, strip_option

LOOPBACK = "127.0.0.1"
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
GRACE_S = 30.0  # as torchrun: how long stopped ranks get to record their run before SIGKILL
_POLL_S = 0.05


def rank_command(argv: list[str]) -> list[str]:
    """What every rank runs: the same ``rcnn-lab`` command line without ``--nproc``."""
    return [sys.executable, "-m", "rcnn_lab", *strip_option(argv, "--nproc")]


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``argv`` (an ``rcnn-lab`` command line) on ``nproc`` local DDP ranks; their exit code."""
    if distributed.env_world().active:
        raise ConfigError([Problem("--nproc", "already running under torchrun; drop --nproc (torchrun sets the processes)")])
    return launch(nproc, rank_command(argv))


def launch(nproc: int, command: list[str], *, grace_s: float = GRACE_S) -> int:
    """Run ``command`` as ranks 0..nproc-1 around a store listening on 127.0.0.1; the exit code:
    0, the first failing rank's code (128 + N for a rank killed by signal N), or 130 when interrupted.

    Call it from the main thread: the kernel sends a rank its death signal (``rcnn_lab.runner.lifeline``)
    when the *thread* that started it ends, not only when the whole process does.
    """
    import subprocess

    from torch.distributed import TCPStore

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(max(128, nproc))
        port = sock.getsockname()[1]
        # torch's default (libuv) store server accepts on a socket it is handed (checked on torch 2.14)
        store = TCPStore(LOOPBACK, port, nproc, is_master=True, master_listen_fd=sock.fileno(),
                         wait_for_workers=False, timeout=timedelta(seconds=60))
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now: it closes it when dropped
    base = dict(os.environ)
    procs = []
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(command, env=rank_env(base, rank, nproc, port)))
        return supervise(procs, grace_s)
    finally:
        for p in procs:  # only if starting a rank failed: supervise() returns once all have ended
            if p.poll() is None:
                p.kill()
                p.wait()
        del store  # the store serves until here, after the last rank has ended


def rank_env(base: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """Rank ``rank``'s environment: torchrun's variables for one machine, loopback sockets,
    ``cores // nproc`` threads, and this process's pid as the launcher's (:data:`LAUNCHER_PID_VAR`);
    ``OMP_NUM_THREADS`` and the socket interfaces keep a value set in ``base``."""
    env = dict(base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", GROUP_WORLD_SIZE="1", MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port),
               TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0")
    env[LAUNCHER_PID_VAR] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // nproc)))
    ifname = loopback_interface()
    for var in IFNAME_VARS:
        if not env.get(var):
            env[var] = ifname
    return env


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return "lo"
    for name in names:
        if _ipv4_address(name) == LOOPBACK:
            return name
    return next((name for name in names if name.startswith("lo")), "lo")


def _ipv4_address(name: str) -> str | None:
    """The IPv4 address of interface ``name`` (Linux ``SIOCGIFADDR``), None where unknown."""
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except (ImportError, OSError):
        return None


def supervise(procs: list, grace_s: float = GRACE_S) -> int:
    """Wait for every rank in ``procs`` (``subprocess.Popen``); see :func:`launch` for the exit code.

    A rank failing, or a SIGINT / SIGTERM to this process, stops the ranks: the signal is passed on
    (SIGTERM for a failure), and ranks still alive ``grace_s`` later are killed. A second signal
    kills them at once.
    """
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    failed: int | None = None
    forwarded = 0  # signals passed on so far
    deadline = None
    try:
        while [p for p in procs if p.poll() is None]:  # every rank polled: returncode set on all that ended
            if failed is None and not received:
                failed = next((_exit_code(p.returncode) for p in procs if p.returncode not in (None, 0)), None)
            stop = received[forwarded:] or ([signal.SIGTERM] if failed is not None and deadline is None else [])
            if stop and deadline is not None:  # asked again: no more grace
                _signal_all(procs, signal.SIGKILL)
            elif stop:
                _signal_all(procs, stop[0])
                deadline = time.monotonic() + grace_s
            forwarded = len(received)
            if deadline is not None and time.monotonic() > deadline:
                _signal_all(procs, signal.SIGKILL)
            time.sleep(_POLL_S)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if received:
        return 130
    if failed is None:
        failed = next((_exit_code(p.returncode) for p in procs if p.returncode), None)
    return failed or 0


def _signal_all(procs: list, sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode

