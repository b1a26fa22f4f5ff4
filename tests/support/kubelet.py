"""What a kubelet does with a pod's Secret volumes and user, done here with files and a fork.

Only the parts a test needs to find out whether a pod's own user can use what the manifest
mounts: a Secret volume's files written with the volume's ``defaultMode``, owned by root and,
when the pod sets ``fsGroup``, by that group (as the kubelet does), and work done with the
pod's ``runAsUser``, ``runAsGroup`` and ``fsGroup`` as a supplementary group (needs root).
The manifest decides every number; nothing here has defaults of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def mount_secret(
    pod: Mapping[str, Any], volume_name: str, data: Mapping[str, str], root: Path
) -> Path:
    """Write the Secret ``data`` as the pod's volume ``volume_name`` would show it."""
    volume = next(v for v in pod["volumes"] if v["name"] == volume_name)
    mode = volume["secret"].get("defaultMode", 0o644)  # the API server's default
    group = pod.get("securityContext", {}).get("fsGroup")
    directory = root / volume_name
    directory.mkdir(parents=True)
    os.chmod(directory, 0o755)
    for name, value in data.items():
        path = directory / name
        path.write_text(value)
        os.chown(path, 0, group if group is not None else 0)
        os.chmod(path, mode)
    return directory


def run_as_pod_user(pod: Mapping[str, Any], work: Callable[[], str]) -> str:
    """Call ``work`` in a child process that has the pod's identity: its ``runAsUser``,
    ``runAsGroup`` and ``fsGroup`` (supplementary), as the container's processes would; return
    what it returned, or ``"error: ..."`` with what it raised. A fork keeps the modules this
    process imported (the pod's user could not read this machine's interpreter under /root)."""
    context = pod.get("securityContext", {})
    groups = [context["fsGroup"]] if "fsGroup" in context else []
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_end)
        try:
            os.setgroups(groups)
            os.setgid(context.get("runAsGroup", 0))
            os.setuid(context["runAsUser"])
            answer = work()
        except BaseException as exc:  # everything goes back to the parent as text
            answer = f"error: {type(exc).__name__}: {exc}"
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(child, 0)
    return answer
