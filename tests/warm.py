"""Python processes that start warm: forked from a server that has imported the package and its libraries.

A test that must see ``rcnn-lab`` as a process of its own (killed with SIGKILL, interrupted, racing another)
spent about 6 of its CPU seconds importing torch, torchvision, MLflow and the package before the command
did anything (docs/benchmarks/test_suite.md). :class:`WarmServer` pays that once per pytest worker: it imports
every module of the package, then forks one child per request (as multiprocessing's ``forkserver`` does).
The child takes the test's stdin/stdout/stderr, working folder, environment and session, SIGINT as in a
terminal, torch's thread count from ``OMP_NUM_THREADS``, and runs the module (``python -m rcnn_lab ...``,
through ``runpy`` as ``-m`` does) or the code (``python -c CODE ...``) of the command; it ends as an
interpreter ends (atexit handlers, exit code, or death by a signal), and the server passes its exit status
back. :class:`WarmProcess` is the test's side, with the part of ``subprocess.Popen``'s interface the tests use.

What a fork does not give: a fresh import (the tests that check what a command imports, and the GPU
suite's quickstart, start real processes), and the processes that ``rcnn-lab`` itself starts (``--nproc``
ranks, ``--parallel`` workers, search workers) are real ones as always.

Run as a script (``python tests/warm.py SOCKET``), this file is the server.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPE, STDOUT = subprocess.PIPE, subprocess.STDOUT


class WarmServer:
    """The server process of one pytest worker (``tests/conftest.py``'s ``warm`` fixture)."""

    def __init__(self, folder: Path):
        self._log = folder / "warm.log"
        self._short = None
        if len(str(folder / "warm.sock")) > 100:  # a socket's path has at most 107 bytes (a deep TMPDIR)
            folder = self._short = Path(tempfile.mkdtemp(prefix="warm-", dir="/tmp"))
        self.path = str(folder / "warm.sock")
        self._counted = 0.0
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm server did not start: {self._log.read_text()[-2000:]}")
            time.sleep(0.02)

    def popen(self, args: list[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None, stdout=None,
              stderr=None, text: bool = False, start_new_session: bool = False) -> WarmProcess:
        """``subprocess.Popen(args, ...)`` for ``args`` = ``[sys.executable, "-m", MODULE, ...]`` or
        ``[sys.executable, "-c", CODE, ...]`` (stdin from /dev/null)."""
        if len(args) < 3 or args[0] != sys.executable or args[1] not in ("-m", "-c"):
            raise ValueError(f"not [sys.executable, -m MODULE | -c CODE, ...]: {args}")
        self.wait_ready()
        return WarmProcess(self.path, args, cwd=os.getcwd() if cwd is None else cwd,
                           env=dict(os.environ if env is None else env), stdout=stdout, stderr=stderr, text=text,
                           new_session=start_new_session, on_end=self._count)

    def _count(self, cpu_s: float) -> None:
        """A child's CPU seconds, for benchmarks/pytest_cputime.py (which counts the processes a test waited for:
        this one was the server's) when it is loaded."""
        cputime = sys.modules.get("pytest_cputime")
        if cputime is not None:
            cputime.add_children_cpu(cpu_s)
            self._counted += cpu_s

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()  # this process's children's CPU now holds the server's and that of every child it reaped
        self._count(-self._counted)  # those were counted when they ended: only the server's own is left
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)


class ColdServer:
    """Where the server cannot run (no ``os.pidfd_open``: not Linux), the same calls start real processes."""

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        from tests.conftest import sigint_as_in_a_terminal

        return subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=sigint_as_in_a_terminal, **kwargs)

    def stop(self) -> None:
        pass


class WarmProcess:
    """One forked process: ``pid``, ``returncode`` (negative: the signal that ended it), ``poll``,
    ``wait``, ``send_signal``, ``kill`` and ``communicate`` as ``subprocess.Popen`` has them."""

    def __init__(self, server: str, args: list[str], *, cwd, env: dict[str, str], stdout, stderr, text: bool,
                 new_session: bool, on_end=lambda cpu_s: None):
        if stderr is PIPE:
            raise ValueError("stderr=PIPE: use stderr=STDOUT or a file")
        request = json.dumps({"args": [str(a) for a in args], "cwd": str(cwd), "env": env,
                              "new_session": new_session}).encode()
        self.args, self.text, self.returncode, self._on_end = args, text, None, on_end
        self._reply = b""
        mine: list[int] = [os.open(os.devnull, os.O_RDONLY)]  # closed here once the server has them
        self._out = None
        if stdout is PIPE:
            self._out, out_w = os.pipe()
            mine.append(out_w)
        else:
            out_w = 1 if stdout is None else stdout.fileno()
        err_w = out_w if stderr is STDOUT else 2 if stderr is None else stderr.fileno()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server)
        socket.send_fds(self._conn, [request + b"\n"], [mine[0], out_w, err_w])  # JSON has no raw newline
        for fd in mine:
            os.close(fd)
        self.pid = int(self._line(None))

    def _line(self, timeout: float | None) -> str | None:
        """The server's next line; None when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._reply:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the warm server went away")
            self._reply += chunk
        line, self._reply = self._reply.split(b"\n", 1)
        return line.decode()

    def _ended(self, line: str) -> None:
        """The server's last line: the exit status and the child's CPU seconds."""
        code, cpu_s = line.split()
        self.returncode = int(code)
        self._conn.close()
        self._on_end(float(cpu_s))

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._line(0)
            if line is not None:
                self._ended(line)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._ended(line)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not a pid the kernel may have given to another process
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        """(stdout read to its end, None), then the exit status, as ``Popen.communicate`` with stderr=STDOUT."""
        deadline = None if timeout is None else time.monotonic() + timeout
        data = b""
        if self._out is not None:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not select.select([self._out], [], [], left)[0]:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                chunk = os.read(self._out, 65536)
                if not chunk:
                    break
                data += chunk
            os.close(self._out)
            self._out = None
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return (data.decode() if self.text else data) if data or self.text else None, None


# --- the server (this file run as a script) --------------------------------------------------------------------


def _preload() -> None:
    """Every module of the package (not ``__main__``, which runs the command) and what a command imports on the way."""
    import pkgutil

    import rcnn_lab

    for module in pkgutil.walk_packages(rcnn_lab.__path__, "rcnn_lab."):
        if not module.name.endswith("__main__"):
            __import__(module.name)
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (what MLflow imports for a sqlite store)


def _serve(path: str):
    """Accept requests until one is for this process: -> (request, its three fds), in the forked child."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(16)
    os.rename(path + ".tmp", path)  # ready: the client waits for the name
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the requester's connection)
    while True:
        for ready in select.select([listener, *children], [], [])[0]:
            if ready is listener:
                conn, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
                while not message.endswith(b"\n"):  # the rest of a request the socket delivered in parts
                    message += conn.recv(1 << 16)
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for pidfd, (_, other) in children.items():
                        os.close(pidfd)
                        other.close()
                    conn.close()
                    return json.loads(message), fds
                for fd in fds:
                    os.close(fd)
                children[os.pidfd_open(pid)] = (pid, conn)
                _send(conn, f"{pid}\n")
            else:
                pid, conn = children.pop(ready)
                _, status, usage = os.wait4(pid, 0)
                os.close(ready)
                _send(conn, f"{os.waitstatus_to_exitcode(status)} {usage.ru_utime + usage.ru_stime:.3f}\n")
                conn.close()


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode())
    except OSError:  # the test has gone (failed, or did not wait): nothing to tell
        pass


def _become(request: dict, fds: list[int]) -> tuple[str, str]:
    """In the forked child: the process ``subprocess.Popen(args, ...)`` would have started; -> (-m or -c, module or code)."""
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground process has it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as Python sets it up at start (stderr: always by line)
    option, target, *rest = request["args"][1:]
    sys.argv = [option, *rest]  # for -m, runpy puts the module's file first, as ``python -m`` does
    sys.path[0] = os.getcwd() if option == "-m" else ""
    import numpy as np
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # read by OpenMP when torch is imported: here, already
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    np.random.seed()  # numpy's global generator, as a new process seeds it (Python's `random` reseeds at fork)
    return option, target


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the package of this checkout, not tests/
    from rcnn_lab.runner.lifeline import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)  # ends with its pytest worker (the children it forked do not)
    _preload()
    request, fds = _serve(sys.argv[1])
    option, target = _become(request, fds)
    if option == "-m":
        import runpy

        runpy.run_module(target, run_name="__main__", alter_sys=True)  # a sys.exit in it ends the interpreter
    else:
        import types

        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(target, "<string>", "exec"), main.__dict__)
