"""Running the command-line tools of the e2e suite (docker, kind, kubectl, helm)."""

from __future__ import annotations

import shutil
import subprocess


def missing_tool() -> str | None:
    """Why the e2e suite cannot run here, or None."""
    for tool in ("docker", "kind", "kubectl", "helm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "docker cannot reach an engine (docker info timed out)"
    if info.returncode != 0:
        return f"docker cannot reach an engine: {info.stderr.strip()[:200]}"
    return None


def run(*args: str, timeout: float = 600, stdin: str | None = None) -> str:
    done = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, input=stdin, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout
