"""The processes ``qtrader bench limiter`` starts: redis-server, the simulator, the floods.

Each is started on a free loopback port in the benchmark's temporary directory and stopped by its
own process id when the ``with`` block ends, also on failure or Ctrl-C: SIGTERM, then SIGKILL
after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qtrader.local.nats_server import free_port

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0


class ServerError(RuntimeError):
    """A process the benchmark needs did not start, or failed."""


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- redis-server -------------------------------------------------------------------------------


def redis_server_binary() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found else None


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(binary: Path, work_dir: Path) -> Iterator[str]:
    """A redis-server without persistence on a free port; yields its URL."""
    port = free_port()
    log_path = work_dir / "redis.log"
    command = [
        str(binary),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(work_dir),
        "--logfile", str(log_path),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _pong(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"redis-server did not answer PING; see {log_path}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


# --- the Binance simulator ----------------------------------------------------------------------


@contextlib.contextmanager
def simulator(config: Mapping[str, Any], work_dir: Path) -> Iterator[str]:
    """``python -m qtrader_tools.simulators.binance_futures`` in its own process; yields its URL."""
    config_path = work_dir / "sim-config.json"
    config_path.write_text(json.dumps(config))
    log_path = work_dir / "sim.log"
    command = [
        sys.executable, "-m", "qtrader_tools.simulators.binance_futures",
        "--port", "0", "--config", str(config_path),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()  # the CLI prints this one line once bound
        if not line.startswith("listening on "):
            raise ServerError(f"the simulator did not start: {line!r}; see {log_path}")
        yield line.removeprefix("listening on ")
    finally:
        _stop(process)
        if process.stdout is not None:
            process.stdout.close()


# --- flood processes ----------------------------------------------------------------------------


def run_floods(
    url: str,
    redis_url: str | None,
    *,
    requests: int,
    seeds: Sequence[int],
    work_dir: Path,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """One ``limiter_flood`` process per seed, all at once; their JSON summaries, in seed order.

    Raises ``ServerError`` when one exits non-zero, prints no summary or runs out of time.
    """
    processes: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for seed in seeds:
            command = [
                sys.executable, "-m", "qtrader_tools.benchmarks.limiter_flood",
                "--url", url, "--requests", str(requests), "--seed", str(seed),
                "--replicas", str(len(seeds)),
            ]  # fmt: skip
            if redis_url is not None:
                command += ["--redis-url", redis_url]
            log_path = work_dir / f"flood-{seed}.log"
            with log_path.open("w") as log_file:
                process = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=log_file, text=True
                )
            processes.append((process, log_path))
        deadline = time.monotonic() + timeout_s
        return [_summary(p, log, deadline) for p, log in processes]
    finally:
        for process, _ in processes:
            _stop(process)
            if process.stdout is not None:
                process.stdout.close()


def _summary(process: subprocess.Popen[str], log_path: Path, deadline: float) -> dict[str, Any]:
    try:
        out, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ServerError(f"a flood process ran out of time; see {log_path}") from None
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        last = lines[-1] if lines else "(no output)"
        raise ServerError(f"a flood process exited {process.returncode}: {last}\n{_tail(log_path)}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
