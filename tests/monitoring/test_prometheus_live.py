"""The chart's alerts and dashboards on a real Prometheus scraping a real local stack.

``qtrader up`` runs the four workloads in paper mode on an embedded nats-server. A real
Prometheus (Debian's binary, ``support.prometheus``) scrapes each workload's ``/metrics`` every
second with the labels the chart's PodMonitor gives a pod (``namespace``, ``pod``, and
``container`` named after the role), loads ``charts/quantum-trader/rules/alerts.yaml`` as it is
(a plain rules file: the chart's PrometheusRule embeds its groups verbatim) and evaluates it
every second. The local control plane is ``qtrader up`` itself and serves no ``/metrics``, so
there is no operator target.

One stack for three phases, in this order, as its start is the slow part and a trip cannot be
undone within the stop's cooldown:

- normal trading: every dashboard query meant to have data has it, and no alert is pending or
  firing but the one local mode always has (``EXPECTED_LOCALLY``);
- a workload SIGKILLed: QtraderWorkloadDown goes pending for its role, and resolves once
  ``qtrader up`` has restarted it, as a kubelet would, well inside the rule's ``for: 1m``;
- ``qtrader ess trip``: the halt queries have data and QtraderEmergencyStopTripped fires (its
  ``for`` is 0: a halt is news at once) with its runbook, and no other alert for the same halt.

Every wait polls with a deadline; nothing sleeps to assert.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from promql_names import ALERTS, DASHBOARDS, dashboard_expressions, names_in
from test_dashboards import grafana_to_promql

from support.local_up import ROLES, LocalUp, find_process, running_up
from support.prometheus import Prometheus, prometheus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "local"
KILLED = "inference"
DEADLINE_S = 60.0
TRIPPED = "QtraderEmergencyStopTripped"

# Pending or firing in local mode whatever happens: qtrader up is the control plane and serves
# no /metrics, so no operator target is up (in a cluster the operator's PodMonitor scrapes it).
# Pending for its first minute, then firing.
EXPECTED_LOCALLY = {"QtraderOperatorDown"}

# The Binance client's metrics (rate limiter, REST requests, its errors): a paper stack has no
# venue client, so every query on them is empty (test_metric_names scrapes them in testnet).
VENUE_METRICS = ("qtrader_ratelimit_", "qtrader_exchange_")
HALT = "only while a latch halts trading: checked after the trip"
# The other queries that are empty in normal paper trading, and why.
QUIET_IN_NORMAL_TRADING = {
    "ess.json: Signals and orders blocked by the latch / A": HALT,
    "ess.json: Halt latency (issued to in force), p50 / p99 / A": HALT,
    "ess.json: Halt latency (issued to in force), p50 / p99 / B": HALT,
    # An order is blocked when an intent decided before a halt reaches the gate after it; a
    # trip between two decisions blocks none (the signals are denied before any intent).
    "ess.json: Signals and orders blocked by the latch / B": "intents caught by a halt: rare",
    "exchange.json: Orders sent and blocked / B": "intents caught by a halt: rare",
    "ess.json: Risk alerts / A": "no risk episode: the test's stop has no trigger set",
    "pipeline.json: Messages/s / C": "messages refused as malformed: none on a healthy bus",
    "pipeline.json: Messages/s / D": "handler errors: none in a healthy run",
}
HALT_QUERIES = sorted(where for where, why in QUIET_IN_NORMAL_TRADING.items() if why == HALT)


def _queries() -> dict[str, str]:
    """``"file: panel / refId" -> PromQL`` of every dashboard query, as Grafana sends it."""
    return {
        f"{path.name}: {where}": grafana_to_promql(expr)
        for path in sorted(DASHBOARDS.glob("*.json"))
        for where, expr in dashboard_expressions(path).items()
        if not where.startswith("variable ")  # label_values() is Grafana's, checked apart
    }


def _venue_only(expr: str) -> bool:
    return all(name.startswith(VENUE_METRICS) for name in names_in(expr))


def _has_data(server: Prometheus, expr: str) -> bool:
    """At least one sample that is a number (histogram_quantile of no events is NaN)."""
    return any(not math.isnan(float(s["value"][1])) for s in server.query(expr))


def _wait(check: Callable[[], bool], what: Callable[[], str], *, timeout_s: float) -> None:
    """Poll ``check`` until it holds; fail with ``what()`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:.0f}s: {what()}")
        time.sleep(0.5)


def _active(server: Prometheus) -> dict[str, str]:
    """``alertname -> state`` of every pending or firing alert (firing wins)."""
    states: dict[str, str] = {}
    for alert in server.alerts():
        name = alert["labels"]["alertname"]
        if states.get(name) != "firing":
            states[name] = alert["state"]
    return states


def _policy(directory: Path) -> Path:
    """The demo policy with a drawdown limit normal trading cannot reach: at 20 candles a
    second the seeded market runs 20 minutes of prices a second and goes past the demo's 3% in
    half a minute (a real breach the drawdown alerts rightly report, not normal trading)."""
    text = (ROOT / "examples/policy.yaml").read_text()
    assert 'maxDrawdownPct: "3"' in text
    path = directory / "policy.yaml"
    path.write_text(text.replace('maxDrawdownPct: "3"', 'maxDrawdownPct: "50"'))
    return path


def _emergency_stop(directory: Path) -> Path:
    """The example stop without its triggers: an automatic trip in the normal phase (a flash
    crash in hours of synthetic prices) would be right, but not what this test looks at."""
    document = yaml.safe_load((ROOT / "examples/emergencystop.yaml").read_text())
    del document["spec"]["triggers"]
    path = directory / "ess.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _config(up: LocalUp) -> dict[str, Any]:
    """Scrape each workload as the chart's PodMonitor would label its pod."""
    targets = [
        {
            "targets": [urlsplit(up.metrics_url(role)).netloc],
            "labels": {"namespace": NAMESPACE, "pod": f"{role}-0", "container": role},
        }
        for role in ROLES
    ]
    return {
        # A timeout may not exceed its interval; /metrics answers in milliseconds.
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "qtrader", "static_configs": targets}],
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalUp, Prometheus]]:
    directory = tmp_path_factory.mktemp("prometheus-live")
    assert "groups" in yaml.safe_load(ALERTS.read_text()), "a plain Prometheus rules file"
    args = (
        "--policy", str(_policy(directory)),
        "--ess", str(_emergency_stop(directory)),
        "--candles-per-second", "20",
        "--data-dir", str(directory / "run"),
    )  # fmt: skip
    with (
        running_up(directory, *args) as up,
        prometheus(_config(up), directory=directory / "prometheus") as server,
    ):
        yield up, server


def _all_targets_up(server: Prometheus) -> None:
    def down() -> list[str]:
        return [t["scrapeUrl"] for t in server.targets() if t["health"] != "up"]

    _wait(
        lambda: len(server.targets()) == 4 and not down(),
        lambda: f"targets down: {down()}",
        timeout_s=DEADLINE_S,
    )


def test_normal_trading_then_dashboards_have_data_and_no_alert_is_active(
    live: tuple[LocalUp, Prometheus],
) -> None:
    up, server = live
    _all_targets_up(server)
    queries = _queries()
    assert QUIET_IN_NORMAL_TRADING.keys() <= queries.keys()  # no stale entry
    expected = {
        where: expr
        for where, expr in queries.items()
        if where not in QUIET_IN_NORMAL_TRADING and not _venue_only(expr)
    }

    def empty() -> list[str]:
        return [where for where, expr in expected.items() if not _has_data(server, expr)]

    _wait(
        lambda: not empty(),
        lambda: f"no data: {empty()}\n--- qtrader up ---\n{up.output()[-3000:]}",
        timeout_s=DEADLINE_S,
    )
    # The dashboards' variable: label_values(qtrader_health_status, namespace).
    assert server.label_values("namespace", match="qtrader_health_status") == [NAMESPACE]
    # The start leaves alerts pending for a moment (a scrape before a worker listened, a feed
    # not started yet); in steady trading only the one local mode always has remains.
    _wait(
        lambda: _active(server).keys() <= EXPECTED_LOCALLY,
        lambda: f"active: {_active(server)}",
        timeout_s=30,
    )


def test_a_killed_workload_then_its_down_alert_goes_pending_until_it_is_back(
    live: tuple[LocalUp, Prometheus],
) -> None:
    up, server = live
    # Scraped before it is killed (this test may be a worker's first on the stack: pytest-xdist
    # spreads a module's tests): an alert needs an answering target to go down.
    _all_targets_up(server)
    os.kill(find_process(up.process.pid, KILLED), signal.SIGKILL)
    # qtrader up starts it again after 1-3 s (its back-off, then the start), more than one
    # scrape interval, so a scrape fails; the rule's history (ALERTS, in the TSDB) shows the
    # pending alert even if no poll falls inside that window.
    history = f'max_over_time(ALERTS{{alertname="QtraderWorkloadDown", container="{KILLED}"}}[5m])'
    _wait(
        lambda: bool(server.query(history)),
        lambda: f"QtraderWorkloadDown never pending; active: {_active(server)}",
        timeout_s=DEADLINE_S,
    )
    [sample] = server.query(history)
    assert sample["metric"]["pod"] == f"{KILLED}-0"
    assert sample["metric"]["alertstate"] == "pending"  # for: 1m, and the restart came first
    [lowest] = server.query(f'min_over_time(up{{container="{KILLED}"}}[5m])')
    assert lowest["value"][1] == "0"

    def back() -> bool:
        health = {t["labels"]["container"]: t["health"] for t in server.targets()}
        return health[KILLED] == "up" and "QtraderWorkloadDown" not in _active(server)

    _wait(back, lambda: f"{KILLED} not back; active: {_active(server)}", timeout_s=DEADLINE_S)
    firing = {name for name, state in _active(server).items() if state == "firing"}
    assert firing <= EXPECTED_LOCALLY, firing


def test_ess_trip_then_halt_queries_have_data_and_the_halt_alert_fires_alone(
    live: tuple[LocalUp, Prometheus],
) -> None:
    up, server = live
    _all_targets_up(server)  # scraped before the trip, so the trip is an increase to rate()
    result = up.cli("ess", "trip", "--reason", "prometheus test")
    assert result.returncode == 0, result.stdout + result.stderr
    queries = _queries()

    def empty() -> list[str]:
        return [where for where in HALT_QUERIES if not _has_data(server, queries[where])]

    # The rule's `for` is 0 (a halt is news at once), so it fires at its first evaluation, with
    # no pending state to catch.
    _wait(
        lambda: _active(server).get(TRIPPED) == "firing",
        lambda: f"active: {_active(server)}",
        timeout_s=DEADLINE_S,
    )
    _wait(lambda: not empty(), lambda: f"no data after the trip: {empty()}", timeout_s=DEADLINE_S)
    [state] = server.query(queries["ess.json: Trading state (worst worker) / A"])
    assert state["value"][1] == "2"  # HALTED
    acks = server.query(queries["ess.json: Halt acknowledgements / A"])
    assert any(a["metric"]["state"] == "HALTED" and float(a["value"][1]) > 0 for a in acks), acks
    [alert] = [a for a in server.alerts() if a["labels"]["alertname"] == TRIPPED]
    assert f"`kubectl -n {NAMESPACE} get emergencystops -o wide`" in alert["annotations"]["runbook"]
    # One alert for one halt: the halted execution worker's DEGRADED health is the halt's.
    _wait(
        lambda: _active(server).keys() <= EXPECTED_LOCALLY | {TRIPPED},
        lambda: f"active: {_active(server)}",
        timeout_s=30,
    )
