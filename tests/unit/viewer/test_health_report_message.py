"""A worker's /health as it travels to the live viewers (``HealthReport.to_message``)."""

from __future__ import annotations

from qtrader.contracts.messages import HealthStatus, WorkloadHealthReport, decode
from qtrader.health.contract import DependencyReport, HealthReport


def test_report_when_a_detail_is_longer_than_the_wire_allows_then_cut_and_still_valid() -> None:
    report = HealthReport(
        service="portfolio",
        status=HealthStatus.CRITICAL,
        version="0.1.0",
        uptime_s=42.0,
        dependencies=[
            DependencyReport(
                name="ledger", status=HealthStatus.CRITICAL, latency_ms=None, detail="x" * 5000
            ),
            DependencyReport(name="nats", status=HealthStatus.OK, latency_ms=0.3, detail="ok"),
        ],
    )
    message = report.to_message(worker_id="host-1", interval_s=2.0, ts_ms=7)
    assert decode(message.encode(), WorkloadHealthReport) == message
    ledger, nats = message.dependencies
    assert len(ledger.detail) == 1024
    assert ledger.detail.endswith("...")
    assert (nats.status, nats.latency_ms, nats.detail) == (HealthStatus.OK, 0.3, "ok")
    assert (message.status, message.service, message.interval_s) == (
        HealthStatus.CRITICAL,
        "portfolio",
        2.0,
    )
