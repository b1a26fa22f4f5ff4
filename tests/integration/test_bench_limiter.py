"""``qtrader bench limiter`` runs end to end at a tiny scale and its correctness figures hold.

Run as the installed console script, as a user runs it: it starts its own redis-server and
simulator and two flood processes, and must stop them all. Checked: the exit code, no 429 and no
418, every figure present and positive, the weight budget never over its limit; without
redis-server on PATH it says so and leaves the shared figures empty. Speed is measured by the
benchmark, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.redis_server import require_redis_server

pytestmark = pytest.mark.integration

QTRADER = Path(sys.executable).parent / "qtrader"
TINY = ["bench", "limiter", "--requests", "300", "--duration", "0.5"]
POSITIVE = (
    "acquire_local_per_s",
    "acquire_local_p50_ms",
    "acquire_local_p99_ms",
    "flood_requests_per_s",
    "raw_per_s",
    "raw_p50_ms",
    "raw_p99_ms",
    "weight_share_max",
    "weight_share_avg",
)
SHARED = ("acquire_shared_per_s", "acquire_shared_p50_ms", "acquire_shared_p99_ms")


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(QTRADER), *args], capture_output=True, text=True, timeout=180, check=False, env=env
    )


def last_json(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def check_flood(result: dict[str, Any]) -> None:
    assert result["benchmark"] == "limiter"
    assert (result["status_429"], result["status_418"]) == (0, 0)
    assert result["flood_requests"] >= 2 * 300
    assert result["flood_errors"] == {}
    for key in POSITIVE:
        assert (result[key] or 0) > 0, (key, result[key])
    assert result["weight_share_max"] <= 1
    assert result["weight_share_max_sliding"] <= 1
    for key, window in result["windows"].items():
        assert window["max_fixed"] <= window["limit"], key
        assert window["max_sliding"] <= window["limit"], key


def test_bench_limiter_when_run_then_no_429_no_418_and_every_figure_present(
    tmp_path: Path,
) -> None:
    require_redis_server()
    output = tmp_path / "figures.json"

    completed = bench(*TINY, "--json", str(output))

    assert completed.returncode == 0, completed.stderr[-4000:]
    result = last_json(completed)
    check_flood(result)
    for key in SHARED:
        assert (result[key] or 0) > 0, (key, result[key])
    assert result["redis"].startswith("redis-server at redis://127.0.0.1:")
    assert result["flood_limiter_modes"] == ["shared", "shared"]
    assert json.loads(output.read_text()) == result
    assert "acquire, shared (Redis)" in completed.stdout  # the table precedes the JSON


def test_bench_limiter_without_redis_server_then_says_so_and_floods_on_half_shares(
    tmp_path: Path,
) -> None:
    # Only the virtual environment's bin on PATH: no redis-server there.
    venv_bin = Path(sys.executable).parent
    assert not (venv_bin / "redis-server").exists()
    env = {**os.environ, "PATH": str(venv_bin)}

    completed = bench(*TINY, env=env)

    assert completed.returncode == 0, completed.stderr[-4000:]
    result = last_json(completed)
    assert result["redis"].startswith("unavailable: redis-server is not on PATH")
    assert all(result[key] is None for key in SHARED)
    assert result["flood_limiter_modes"] == ["local", "local"]
    check_flood(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--requests", "5"], "--requests: must be 100-1000000, got 5"),
        (["--requests", "lots"], "--requests: 'lots' is not a whole number"),
        (["--duration", "0"], "--duration: --duration must be > 0, got 0"),
        (["--duration", "601"], "--duration: --duration must be <= 600, got 601"),
        (["--json", "/no/such/dir/out.json"], "--json: no such directory: /no/such/dir"),
    ],
)
def test_bench_limiter_when_bad_argument_then_exit_2_saying_what(
    args: list[str], message: str
) -> None:
    completed = bench("bench", "limiter", *args)
    assert completed.returncode == 2
    assert message in completed.stderr
