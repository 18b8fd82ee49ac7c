"""A child process that ends with the process that started it: ``--nproc`` ranks and ``--parallel`` workers.

A launcher that is killed outright (SIGKILL, the OOM killer, a scheduler's hard kill) cannot pass
anything on to the processes it started. On Linux each of them asks the kernel, first thing, for
SIGTERM when its launcher ends (``prctl(PR_SET_PDEATHSIG)``), and stops on it as on Ctrl-C
(``rcnn_lab.runner.parallel.join``): its run is recorded KILLED and rerunning the command resumes it.
A launcher names itself in the child's environment (:data:`LAUNCHER_PID_VAR`); ``python -m rcnn_lab``
calls :func:`die_with_launcher` before anything else. The kernel sends the signal when the *thread*
that started the child ends: start children from the main thread.

This module imports nothing of torch or the runner: a child imports it first thing
(``tests/runner/test_launch.py`` checks).
"""

from __future__ import annotations

import os
import signal
import sys

LAUNCHER_PID_VAR = "RCNN_LAB_LAUNCHER_PID"  # in a child's environment: the pid of the process that started it
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher() -> None:
    """In a process whose environment names its launcher: be sent SIGTERM when the launcher ends,
    however it ends; a no-op in any other process.

    A launcher that ended before the signal was asked for sends none: the process's parent is then
    no longer the launcher, and the process sends the signal to itself (one still starting up just exits).
    """
    launcher = os.environ.pop(LAUNCHER_PID_VAR, "")  # not passed on: the child's own children are not its launcher's
    if not launcher.isdigit():  # unset (not a child), or not a pid (set by hand): nothing to follow
        return
    if set_parent_death_signal(signal.SIGTERM) and os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGTERM)


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends (Linux ``prctl(PR_SET_PDEATHSIG)``,
    also after a SIGKILL of the parent); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False  # no such call (macOS, Windows): children there are stopped by their launcher alone, which SIGKILL skips
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc with prctl (unusual builds)
        return False
