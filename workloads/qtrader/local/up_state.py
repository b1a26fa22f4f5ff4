"""Where the local stack is: ``.qtrader/up.json``, written by ``qtrader up`` in its directory.

``qtrader ess`` and ``qtrader policy`` run in another terminal and must reach the NATS server that
``qtrader up`` started on a free port. ``up`` writes ``{"nats_url", "pid", "ess", "health",
"console"}`` (``console``: the live console's URL) to ``.qtrader/up.json`` in the current
directory and removes it when it exits; the commands read it unless ``--nats-url`` is given.
A file whose process is gone (``up`` was killed) counts as no stack. A second ``up`` in the same
directory leaves a live stack's file alone, so the commands keep talking to the stack that was
there first.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = Path(".qtrader") / "up.json"


class NoStack(Exception):
    """No running local stack was found; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class UpState:
    nats_url: str
    pid: int
    ess: str = "main"
    health: dict[str, str] = field(default_factory=dict)  # role -> its /health URL
    console: str = ""  # the live console's page


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    return True


def _load(path: Path) -> UpState | None:
    try:
        raw = json.loads(path.read_text())
        return UpState(
            nats_url=str(raw["nats_url"]),
            pid=int(raw["pid"]),
            ess=str(raw.get("ess", "main")),
            health={str(k): str(v) for k, v in dict(raw.get("health", {})).items()},
            console=str(raw.get("console", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(state: UpState, directory: Path) -> UpState | None:
    """Write ``state`` unless a live stack owns the file; returns that other stack, else None."""
    path = directory / STATE_FILE
    other = _load(path)
    if other is not None and other.pid != state.pid and pid_alive(other.pid):
        return other
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{state.pid}.tmp")
    scratch.write_text(json.dumps(asdict(state), indent=2) + "\n")
    scratch.replace(path)  # atomic: a reader sees the old file or the new one
    return None


def release(directory: Path, *, pid: int) -> None:
    """Remove the file if this process wrote it."""
    path = directory / STATE_FILE
    current = _load(path)
    if current is not None and current.pid == pid:
        path.unlink(missing_ok=True)


def find(directory: Path) -> UpState:
    """The running stack of ``directory``; NoStack says why there is none."""
    path = directory / STATE_FILE
    if not path.exists():
        raise NoStack(
            f"no local stack is running here (no {STATE_FILE}): start one with `qtrader up` "
            "in this directory, or pass --nats-url"
        )
    state = _load(path)
    if state is None:
        raise NoStack(f"{path} is unreadable; pass --nats-url")
    if not pid_alive(state.pid):
        raise NoStack(
            f"the stack that wrote {STATE_FILE} (pid {state.pid}) is not running any more; "
            "start one with `qtrader up`"
        )
    return state
