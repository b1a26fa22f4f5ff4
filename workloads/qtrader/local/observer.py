"""What ``qtrader up`` shows: the pipeline's event counts, the portfolio, each workload's health.

The observer is a plain NATS client: it subscribes to the same subjects the workloads publish on
(core subscriptions see every JetStream publish) and polls each workload's ``/health``. It never
talks to a workload's internals, so what it shows is what a dashboard would show.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

import httpx

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    Fill,
    Message,
    OrderIntent,
    OrderUpdate,
    PortfolioSnapshot,
    Signal,
)

M = TypeVar("M", bound=Message)


@dataclass
class PipelineCounts:
    candles: int = 0
    signals: int = 0
    intents: int = 0
    fills: int = 0
    order_statuses: Counter[str] = field(default_factory=Counter)
    signal_times: list[float] = field(default_factory=list)

    def signals_per_second(self, window_s: float = 5.0) -> float:
        cutoff = time.monotonic() - window_s
        self.signal_times = [t for t in self.signal_times if t >= cutoff]
        return len(self.signal_times) / window_s


@dataclass(frozen=True, kw_only=True)
class WorkloadHealth:
    service: str
    status: str
    detail: str


class Observer:
    def __init__(self, *, bus: Bus, health_urls: dict[str, str]) -> None:
        self._bus = bus
        self._health_urls = health_urls
        self.counts = PipelineCounts()
        self.snapshot: PortfolioSnapshot | None = None
        self.health: dict[str, WorkloadHealth] = {
            role: WorkloadHealth(service=role, status="STARTING", detail="") for role in health_urls
        }

    def tasks(self) -> list[asyncio.Task[None]]:
        watch = self._watch
        return [
            watch("candles", subjects.all_of(subjects.CANDLE_PREFIX), Candle, self._on_candle),
            watch("signals", subjects.all_of(subjects.SIGNAL_PREFIX), Signal, self._on_signal),
            watch(
                "intents",
                subjects.all_of(subjects.ORDER_INTENT_PREFIX),
                OrderIntent,
                self._on_intent,
            ),
            watch(
                "orders",
                subjects.all_of(subjects.ORDER_UPDATE_PREFIX),
                OrderUpdate,
                self._on_update,
            ),
            watch("fills", subjects.all_of(subjects.FILL_PREFIX), Fill, self._on_fill),
            watch("portfolio", subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot, self._on_snapshot),
            asyncio.create_task(self._poll_health(), name="observe-health"),
        ]

    def _watch(
        self, name: str, subject: str, kind: type[M], handler: Callable[[M], Awaitable[None]]
    ) -> asyncio.Task[None]:
        label = f"observe-{name}"
        return asyncio.create_task(
            self._bus.subscribe(subject, kind, handler, label=label), name=label
        )

    async def _on_candle(self, _: Candle) -> None:
        self.counts.candles += 1

    async def _on_signal(self, _: Signal) -> None:
        self.counts.signals += 1
        self.counts.signal_times.append(time.monotonic())

    async def _on_intent(self, _: OrderIntent) -> None:
        self.counts.intents += 1

    async def _on_update(self, update: OrderUpdate) -> None:
        self.counts.order_statuses[update.status.value] += 1

    async def _on_fill(self, _: Fill) -> None:
        self.counts.fills += 1

    async def _on_snapshot(self, snapshot: PortfolioSnapshot) -> None:
        if self.snapshot is None or snapshot.sequence >= self.snapshot.sequence:
            self.snapshot = snapshot

    async def _poll_health(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                await self.refresh_health(client)
                await asyncio.sleep(1.0)

    async def refresh_health(self, client: httpx.AsyncClient) -> None:
        for role, url in self._health_urls.items():
            self.health[role] = await _fetch_health(client, role, url)


async def _fetch_health(client: httpx.AsyncClient, role: str, url: str) -> WorkloadHealth:
    try:
        body = (await client.get(url)).json()
    except (httpx.HTTPError, ValueError) as exc:
        return WorkloadHealth(service=role, status="UNREACHABLE", detail=type(exc).__name__)
    problems = [
        f"{d['name']}: {d['detail']}" for d in body.get("dependencies", []) if d["status"] != "OK"
    ]
    return WorkloadHealth(service=role, status=body.get("status", "?"), detail="; ".join(problems))


def _money(value: Decimal) -> str:
    return f"{value:,.2f}"


def render(observer: Observer, *, elapsed_s: float, title: str) -> str:
    counts = observer.counts
    lines = [
        f"{title}  (running {elapsed_s:.0f}s, Ctrl-C to stop)",
        "",
        f"candles {counts.candles}   signals {counts.signals} "
        f"({counts.signals_per_second():.1f}/s)   intents {counts.intents}   "
        f"fills {counts.fills}",
        "orders  "
        + (", ".join(f"{k} {v}" for k, v in sorted(counts.order_statuses.items())) or "-"),
        "",
    ]
    snapshot = observer.snapshot
    if snapshot is None:
        lines.append("portfolio: no snapshot yet")
    else:
        lines += [
            f"equity {_money(snapshot.equity)}   realized {_money(snapshot.realized_pnl)}   "
            f"unrealized {_money(snapshot.unrealized_pnl)}   fees {_money(snapshot.fees)}",
            f"drawdown {snapshot.drawdown_pct:.3f}%   max drawdown "
            f"{snapshot.max_drawdown_pct:.3f}%   open positions {snapshot.open_positions}",
        ]
        for position in snapshot.positions:
            if position.quantity != 0:
                lines.append(
                    f"  {position.symbol:<10} qty {position.quantity:>12}  entry "
                    f"{position.avg_entry_price:.4f}  mark {position.mark_price}  "
                    f"uPnL {_money(position.unrealized_pnl)}"
                )
    lines.append("")
    for health in observer.health.values():
        detail = f"  ({health.detail})" if health.detail else ""
        lines.append(f"{health.service:<11} {health.status}{detail}")
    return "\n".join(lines)
