"""What the operator's handlers share: its configuration and its live connections.

Built once by the startup handler and kept in kopf's memo: the NATS connection and the stacks it
serves (``stacks``: one per TradingPolicy, each with its policy key, halt latch, heartbeat,
acknowledgements, risk alerts and risk monitor), the Kubernetes client for Deployments, the
venue listings used to validate policies, the metrics, and the background tasks that run
beside the handlers. With peering (``leadership``), only the leading replica runs the latch
keeper and the stacks' leader work; a standby stays connected and takes over from what is
stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.messages import HaltLatch
from qtrader.control.ess_applier import AckMemory
from qtrader.control.ess_status import EssStatus
from qtrader.control.halt_channel import AckCollector
from qtrader.exchange.listing import VenueListings
from qtrader_operator.cancelling import HandlerRuns, cancel_and_wait
from qtrader_operator.kube import KubeApi, KubeEndpoint
from qtrader_operator.leadership import Leadership, PeeringConfig
from qtrader_operator.metrics import OperatorMetrics, OperatorView, PolicyView, StopView
from qtrader_operator.policy_core import PodDefaults, SecretKey
from qtrader_operator.stacks import AlertHandler, Stacks

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    namespace: str
    nats_url: str
    workload_image: str
    # Images a policy may name for a workload besides ``workload_image`` (none by default).
    allowed_images: frozenset[str] = frozenset()
    redis_url: str | None = None  # without credentials; with them, ``redis_secret``
    redis_secret: SecretKey | None = None
    binance_secret: str | None = None
    # The Binance REST base URL for testnet and live (None: by the mode); execution uses it too.
    exchange_url: str | None = None
    # Execution's reads of the venue's income (--income-interval; None: its own default).
    income_interval_s: float | None = None
    # How long the portfolio lets the wallet differ before alerting (--wallet-grace; None: its
    # own default).
    wallet_grace_s: float | None = None
    pod_defaults: PodDefaults = field(default_factory=lambda: PodDefaults())
    # None: the in-cluster service account (the normal case); tests point it elsewhere.
    kube: KubeEndpoint | None = None
    heartbeat_interval_s: float = 1.0
    # Where ``/metrics`` is served (None: not served; the chart sets a port).
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None
    # How long one watch request may stay open before the API server ends it (kopf reopens it);
    # it also bounds how long stopping the operator can take.
    watch_timeout_s: float = 60.0
    # None: this is the only replica (kopf standalone), so it always leads.
    peering: PeeringConfig | None = None


@dataclass
class EssMemory:
    """What the operator remembers between reconciles of one EmergencyStop.

    ``status`` is the status this process last decided. kopf hands a handler the body it last
    saw, and a status patch reaches that body only after the watch echoes it back: deciding from
    the body could step back to an older status and reuse a latch revision the workers already
    hold. The operator is the status's only writer, so its own last decision is the truth; the
    body's status is read only once, after a restart. ``lock`` keeps the handler and the timer
    of one object from deciding at the same time.
    """

    status: EssStatus | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    acks: AckMemory = field(default_factory=AckMemory)  # the applier's: latch written, reported
    scaled_for: tuple[int, str] | None = None  # (latch revision, state) the workloads match
    pending_workers: int = 0  # known workers yet to acknowledge the latch in force


@dataclass
class OperatorRuntime:
    config: OperatorConfig
    bus: Bus
    kube: KubeApi
    acks: AckCollector  # every stack's workers, named <stack>/<worker id>
    stacks: Stacks
    # Each mode's venue listing, a Binance venue's fetched when a policy first needs it.
    listings: VenueListings = field(default_factory=VenueListings)
    ess: dict[str, EssMemory] = field(default_factory=dict)
    # One writer of the halt latch at a time (a stop's reconcile or the keeper): each reads the
    # latch in force, combines every stop and writes; the bus has no compare-and-set.
    latch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    latch: HaltLatch | None = None  # the latch in force, as last read or written
    # One scaler of the workloads at a time (a policy's reconcile or the scaling after a latch):
    # a reconcile that read the stops before a trip must not apply its replicas after the
    # trip's scaling set them to 0 (it waits, then reads the trip).
    scale_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    policies: dict[str, PolicyView] = field(default_factory=dict)  # as last reconciled
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    leadership: Leadership = field(default_factory=lambda: Leadership(None, namespace=""))
    keeper: asyncio.Task[None] | None = None  # the latch keeper, while this replica leads
    handler_runs: HandlerRuns = field(default_factory=HandlerRuns)  # reconciles in progress
    # Workloads whose other kind (Deployment or StatefulSet) this process has made sure is gone.
    kinds_settled: set[str] = field(default_factory=set)
    metrics: OperatorMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = OperatorMetrics(self.view, now=lambda: datetime.now(UTC))

    @classmethod
    async def start(cls, config: OperatorConfig, *, on_alert: AlertHandler) -> OperatorRuntime:
        """Connect; ``on_alert`` receives the risk alerts of every stack."""
        bus = Bus(url=config.nats_url, client_name="qtrader-operator")
        await bus.connect()
        kube = KubeApi(config.kube or KubeEndpoint.discover())
        acks = AckCollector()
        leadership = Leadership(config.peering, namespace=config.namespace)
        # Heartbeats and alerts name the replica that sent them.
        identity = leadership.identity
        source = "qtrader-operator" if identity is None else f"qtrader-operator/{identity}"
        stacks = Stacks(
            bus,
            acks=acks,
            on_alert=on_alert,
            heartbeat_interval_s=config.heartbeat_interval_s,
            source=source,
        )
        runtime = cls(
            config=config,
            bus=bus,
            kube=kube,
            acks=acks,
            stacks=stacks,
            leadership=leadership,
            listings=VenueListings(config.exchange_url),
        )
        if config.metrics_port is not None:
            port = runtime.metrics.serve(config.metrics_host, config.metrics_port)
            log.info("metrics on %s:%d/metrics", config.metrics_host, port)
        return runtime

    def spawn(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(_report_end)
        self.tasks.append(task)

    def memory(self, name: str) -> EssMemory:
        return self.ess.setdefault(name, EssMemory())

    def view(self) -> OperatorView:
        """What the metrics show, copied at scrape time (called from the server's thread: it
        only reads, and copies each mapping before walking it)."""
        stops = {
            name: StopView(status=memory.status, pending_workers=memory.pending_workers)
            for name, memory in dict(self.ess).items()
            if memory.status is not None
        }
        return OperatorView(stops=stops, policies=dict(self.policies), latch=self.latch)

    def forget_decisions(self) -> None:
        """Drop what this process decided (each stop's status, the latch in force): after a
        change of leader the other replica may have decided since, so the next reconcile and
        keeper round read the stored statuses and the latches afresh (first sight)."""
        self.ess.clear()
        self.latch = None
        self.policies.clear()  # the metrics of a standby show nothing it did not decide

    async def stop(self) -> None:
        await self.handler_runs.stop_all()  # before their clients close (``HandlerRuns``)
        if self.keeper is not None:
            self.tasks.append(self.keeper)
        await cancel_and_wait(self.tasks)
        await self.stacks.close()
        self.metrics.close()
        with contextlib.suppress(Exception):
            await self.kube.close()
        await self.bus.close()


def _report_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("operator task %s failed", task.get_name(), exc_info=exc)
    else:
        log.error("operator task %s ended unexpectedly", task.get_name())
