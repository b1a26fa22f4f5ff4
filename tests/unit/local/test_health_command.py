"""``qtrader health`` without workloads: rows, table, JSON, exit codes, and what it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtrader.cli import main
from qtrader.health.contract import Status
from qtrader.local.health import Row, exit_code, health_url, render_json, render_table
from qtrader.local.nats_server import free_port


def _row(component: str, status: Status, kind: str = "workload") -> Row:
    return Row(component=component, kind=kind, status=status, latency_ms=1.25, detail="d")


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ([Status.OK, Status.OK], 0),
        ([Status.OK, Status.DEGRADED], 1),
        ([Status.DEGRADED, Status.CRITICAL, Status.OK], 2),
    ],
)
def test_exit_code_when_rows_then_worst_status(statuses: list[Status], code: int) -> None:
    assert exit_code([_row(f"c{i}", s) for i, s in enumerate(statuses)]) == code


def test_render_table_when_rows_then_one_aligned_line_each_and_overall() -> None:
    rows = [_row("execution", Status.OK), _row("execution/nats", Status.DEGRADED, "dependency")]
    lines = render_table(rows).splitlines()
    assert lines[0].split() == ["COMPONENT", "KIND", "STATUS", "LATENCY", "DETAIL"]
    assert lines[1].split() == ["execution", "workload", "OK", "1.2", "ms", "d"]
    assert lines[2].split()[:3] == ["execution/nats", "dependency", "DEGRADED"]
    assert lines[0].index("STATUS") == lines[1].index("OK") == lines[2].index("DEGRADED")
    assert lines[-1] == "overall: DEGRADED"


def test_render_json_when_rows_then_status_and_components() -> None:
    body = json.loads(render_json([_row("portfolio", Status.CRITICAL)]))
    assert body["status"] == "CRITICAL"
    assert body["components"] == [
        {
            "component": "portfolio",
            "kind": "workload",
            "status": "CRITICAL",
            "latency_ms": 1.25,
            "detail": "d",
        }
    ]


@pytest.mark.parametrize(
    "url", ["http://h:1", "http://h:1/", "http://h:1/health", "http://h:1/health/"]
)
def test_health_url_when_base_or_health_url_then_health_url(url: str) -> None:
    assert health_url(url) == "http://h:1/health"


def test_health_when_url_unreachable_then_critical_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()  # nothing listens there
    code = main(["health", "--url", f"http://127.0.0.1:{port}", "--timeout", "2"])
    out = capsys.readouterr().out
    assert code == 2
    assert f"127.0.0.1:{port}" in out
    assert "CRITICAL" in out
    assert "unreachable" in out
    assert out.splitlines()[-1] == "overall: CRITICAL"


def test_health_when_nats_url_unreachable_then_critical_nats_row(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    code = main(["health", "--url", f"http://127.0.0.1:{free_port()}", "--nats-url",
                 f"nats://127.0.0.1:{port}", "--json"])  # fmt: skip
    body = json.loads(capsys.readouterr().out)
    assert code == 2
    nats = [c for c in body["components"] if c["component"] == "nats"]
    assert nats
    assert nats[0]["status"] == "CRITICAL"


def test_health_when_no_stack_and_no_url_then_says_so_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qtrader", "health"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 2
    assert "no local stack is running here" in result.stderr
    assert "--url" in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["health", "--url", "ftp://x"], "is not an http(s) URL"),
        (["health", "--nats-url", "http://x:4222"], "NATS URL must start with"),
        (["health", "--timeout", "0"], "--timeout must be > 0"),
    ],
)
def test_health_when_bad_argument_then_exit_2_with_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
