"""Hang a process (SIGSTOP: alive, silent) and know it is hung before going on.

``kill`` returns before the signal has taken effect: a process running on another core goes
on until the kernel next preempts it, and on a loaded machine a broker stopped that way still
answered the first messages published after the ``kill``. So ``hang`` returns only once
``/proc`` reports the process stopped.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_STOPPED = ("T", "t")  # stopped; stopped by a tracer


def hang(pid: int, *, timeout_s: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped; resume it with ``resume``."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while _state(pid) not in _STOPPED:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} not stopped {timeout_s:g}s after SIGSTOP")
        time.sleep(0.001)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def _state(pid: int) -> str:
    """The one-letter state of ``/proc/<pid>/stat``: the field after the command's ')'."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]
