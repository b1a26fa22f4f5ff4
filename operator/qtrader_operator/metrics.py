"""The operator's Prometheus metrics: what it decided, read at scrape time.

Once a trip scales execution to 0, the workers' own ``qtrader_trading_state`` is gone with them;
the halt alert is built on the operator's series instead, which live as long as the operator:

* per EmergencyStop: its state (one series per state, 1 for the current one), trips and resets
  (the counts its status keeps, so they survive restarts), workers still to acknowledge the
  latch, and the cooldown left (computed at scrape time, so it is never stale);
* the halt latch in force (its state as ``TradingState.restriction`` and its revision);
* per TradingPolicy: the policy revision published and each workload's desired and ready
  replicas;
* reconcile errors by resource kind (a counter).

The metrics have their own registry: the operator's process also imports the workloads' code,
whose module-level metrics must not appear on its endpoint as if they were live.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from qtrader.contracts.messages import HaltLatch
from qtrader.control.ess import EssState
from qtrader.control.ess_status import EssStatus


@dataclass(frozen=True, kw_only=True)
class StopView:
    status: EssStatus
    pending_workers: int


@dataclass(frozen=True, kw_only=True)
class PolicyView:
    revision: int
    # workload -> (desired, ready) replicas
    workloads: Mapping[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class OperatorView:
    """What the collector reads at each scrape (the handlers' memory, copied)."""

    stops: Mapping[str, StopView]
    policies: Mapping[str, PolicyView]
    latch: HaltLatch | None


class OperatorCollector(Collector):
    def __init__(self, view: Callable[[], OperatorView], now: Callable[[], datetime]) -> None:
        self._view = view
        self._now = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self._view()
        yield from _stop_families(view.stops, now=self._now())
        yield from _latch_families(view.latch)
        yield from _policy_families(view.policies)


def _stop_families(stops: Mapping[str, StopView], *, now: datetime) -> Iterator[GaugeMetricFamily]:
    state = GaugeMetricFamily(
        "qtrader_operator_emergency_stop_state",
        "1 for the EmergencyStop's current state, 0 for the others.",
        labels=["stop", "state"],
    )
    trips = GaugeMetricFamily(
        "qtrader_operator_emergency_stop_trips", "Trips in the stop's status.", labels=["stop"]
    )
    resets = GaugeMetricFamily(
        "qtrader_operator_emergency_stop_resets", "Resets in the stop's status.", labels=["stop"]
    )
    pending = GaugeMetricFamily(
        "qtrader_operator_emergency_stop_pending_workers",
        "Known workers that have not acknowledged the latch in force.",
        labels=["stop"],
    )
    cooldown = GaugeMetricFamily(
        "qtrader_operator_emergency_stop_cooldown_remaining_seconds",
        "Seconds before a reset is allowed (0 when none is due).",
        labels=["stop"],
    )
    for name, stop in sorted(stops.items()):
        for each in EssState:
            state.add_metric([name, each.value], 1.0 if stop.status.state is each else 0.0)
        trips.add_metric([name], stop.status.trip_count)
        resets.add_metric([name], stop.status.reset_count)
        pending.add_metric([name], stop.pending_workers)
        until = stop.status.cooldown_until
        cooldown.add_metric([name], max(0.0, (until - now).total_seconds()) if until else 0.0)
    yield from (state, trips, resets, pending, cooldown)


def _latch_families(latch: HaltLatch | None) -> Iterator[GaugeMetricFamily]:
    if latch is None:  # nothing decided yet: absent, and the operator-down alert covers it
        return
    yield GaugeMetricFamily(
        "qtrader_operator_trading_state",
        "The most restrictive halt latch in force over the namespace's policies: 0 ACTIVE,"
        " 1 REDUCING, 2 HALTED (as qtrader_trading_state).",
        value=latch.state.restriction,
    )
    yield GaugeMetricFamily(
        "qtrader_operator_halt_latch_revision",
        "Revision of the halt latch in force.",
        value=latch.revision,
    )


def _policy_families(policies: Mapping[str, PolicyView]) -> Iterator[GaugeMetricFamily]:
    revision = GaugeMetricFamily(
        "qtrader_operator_policy_revision",
        "Revision of the policy published to its workloads.",
        labels=["policy"],
    )
    replicas = GaugeMetricFamily(
        "qtrader_operator_workload_replicas",
        "Replicas of a policy's workload: desired (what the operator set) and ready.",
        labels=["policy", "workload", "kind"],
    )
    for name, policy in sorted(policies.items()):
        revision.add_metric([name], policy.revision)
        for workload, (desired, ready) in sorted(policy.workloads.items()):
            replicas.add_metric([name, workload, "desired"], desired)
            replicas.add_metric([name, workload, "ready"], ready)
    yield from (revision, replicas)


class OperatorMetrics:
    """The registry, the reconcile-error counter, and the HTTP endpoint serving them."""

    def __init__(self, view: Callable[[], OperatorView], now: Callable[[], datetime]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(OperatorCollector(view, now))
        frozen = Gauge(
            "qtrader_gc_frozen_objects",
            "Objects made while the operator started, kept out of the garbage collector's "
            "walks (0 when it was not started as a process: qtrader_operator.main.run).",
            registry=self.registry,
        )
        frozen.set_function(gc.get_freeze_count)
        self.reconcile_errors = Counter(
            "qtrader_operator_reconcile_errors_total",
            "Reconciles that ended in an error (kopf retries them), by resource kind.",
            ["resource"],
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None

    @contextlib.contextmanager
    def counting_errors(self, resource: str) -> Iterator[None]:
        """Count an exception leaving the block (kopf then retries the reconcile)."""
        try:
            yield
        except Exception:
            self.reconcile_errors.labels(resource).inc()
            raise
