"""The health contract every workload serves: ``/healthz``, ``/readyz``, ``/health``, ``/metrics``.

- ``/healthz``: the process and its event loop are alive (the liveness probe).
- ``/readyz``: 200 only while no dependency is CRITICAL (the readiness probe), else 503.
- ``/health``: JSON ``{service, status, version, uptime_s, dependencies: [{name, status,
  latency_ms, detail}]}``; the status is the worst of the dependencies'.
- ``/metrics``: Prometheus text exposition of the process's default registry.

A check is an async callable returning ``DependencyHealth``; a check that raises is itself
reported CRITICAL with the error, so a broken check can never make a workload look healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import BaseModel

from qtrader import __version__
from qtrader.contracts.messages import DependencyState, HealthStatus, WorkloadHealthReport

log = logging.getLogger(__name__)

HEALTH_STATUS = Gauge(
    "qtrader_health_status",
    "The workload's health: 0 OK, 1 DEGRADED, 2 CRITICAL.",
    ["service"],
)
DEPENDENCY_STATUS = Gauge(
    "qtrader_dependency_status",
    "Each dependency's health: 0 OK, 1 DEGRADED, 2 CRITICAL.",
    ["service", "dependency"],
)


REFRESH_INTERVAL_S = 2.0  # how often the gauges are refreshed and a report is sent

# The wire contracts own the enum: a health report travels on NATS too (``WorkloadHealthReport``).
Status = HealthStatus


def worst(statuses: list[Status]) -> Status:
    return max(statuses, key=lambda s: s.severity, default=Status.OK)


@dataclass(frozen=True, kw_only=True)
class DependencyHealth:
    name: str
    status: Status
    detail: str = ""
    latency_ms: float | None = None


Check = Callable[[], Awaitable[DependencyHealth]]


class DependencyReport(BaseModel):
    name: str
    status: Status
    latency_ms: float | None
    detail: str


class HealthReport(BaseModel):
    service: str
    status: Status
    version: str
    uptime_s: float
    dependencies: list[DependencyReport]

    @property
    def ready(self) -> bool:
        return all(d.status is not Status.CRITICAL for d in self.dependencies)

    def to_message(self, *, worker_id: str, interval_s: float, ts_ms: int) -> WorkloadHealthReport:
        """This report as it travels on NATS; long details are cut to the wire's bound."""
        return WorkloadHealthReport(
            service=self.service,
            worker_id=worker_id[:256],
            status=self.status,
            version=self.version[:64],
            uptime_s=self.uptime_s,
            interval_s=interval_s,
            dependencies=tuple(
                DependencyState(
                    name=d.name[:64],
                    status=d.status,
                    detail=_cut(d.detail, 1024),
                    latency_ms=d.latency_ms,
                )
                for d in self.dependencies[:64]
            ),
            ts_ms=ts_ms,
        )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class HealthMonitor:
    """Runs a workload's checks and keeps the health gauges current."""

    def __init__(self, *, service: str, check_timeout_s: float = 2.0) -> None:
        self.service = service
        self._checks: list[tuple[str, Check]] = []
        self._timeout = check_timeout_s
        self._started = time.monotonic()

    def add_check(self, name: str, check: Check) -> None:
        self._checks.append((name, check))

    async def report(self) -> HealthReport:
        results = await asyncio.gather(*(self._run(name, check) for name, check in self._checks))
        status = worst([r.status for r in results])
        HEALTH_STATUS.labels(self.service).set(status.severity)
        for result in results:
            DEPENDENCY_STATUS.labels(self.service, result.name).set(result.status.severity)
        return HealthReport(
            service=self.service,
            status=status,
            version=__version__,
            uptime_s=round(time.monotonic() - self._started, 3),
            dependencies=[
                DependencyReport(
                    name=r.name,
                    status=r.status,
                    latency_ms=None if r.latency_ms is None else round(r.latency_ms, 3),
                    detail=r.detail,
                )
                for r in results
            ],
        )

    async def _run(self, name: str, check: Check) -> DependencyHealth:
        try:
            return await asyncio.wait_for(check(), self._timeout)
        except TimeoutError:
            return DependencyHealth(
                name=name, status=Status.CRITICAL, detail=f"check timed out after {self._timeout}s"
            )
        except Exception as exc:
            log.exception("health check %s failed", name)
            return DependencyHealth(
                name=name, status=Status.CRITICAL, detail=f"check failed: {exc!r}"
            )

    async def refresh_forever(
        self,
        interval_s: float = REFRESH_INTERVAL_S,
        *,
        on_report: Callable[[HealthReport], Awaitable[None]] | None = None,
    ) -> None:
        """Keep the health gauges current for Prometheus even when nobody calls /health, and
        hand every report to ``on_report`` (the worker runtime sends it to the live viewers)."""
        while True:
            report = await self.report()
            if on_report is not None:
                await on_report(report)
            await asyncio.sleep(interval_s)


def create_app(monitor: HealthMonitor) -> FastAPI:
    app = FastAPI(title=f"qtrader {monitor.service}", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        report = await monitor.report()
        return JSONResponse(
            {"ready": report.ready, "status": report.status.value},
            status_code=200 if report.ready else 503,
        )

    @app.get("/health")
    async def health() -> HealthReport:
        return await monitor.report()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a worker's event loop: the worker, not uvicorn, owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Serve the health app in the current event loop until cancelled, then close the socket."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = _EmbeddedServer(config)
    serving = asyncio.create_task(server.serve(), name=f"health-server:{port}")
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await serving
        raise
