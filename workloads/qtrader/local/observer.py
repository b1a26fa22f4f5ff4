"""What ``qtrader up`` shows: the pipeline's event counts, the portfolio, each workload's health.

The observer is a plain NATS client: it follows the streams the workloads publish to, from the
moment it starts, and polls each workload's ``/health``. It never talks to a workload's
internals, so what it shows is what a dashboard would show.

Why the streams and not core subscriptions: a core subscription misses what is published while
it reconnects (a broker restart) and also sees a publish the stream drops as a duplicate (an
outbox replay, a restarted worker sending the same ``Nats-Msg-Id`` again), so its counts drift
from what was stored, and the final report would say so. An ordered consumer resumes after the
last message it saw; each kind is also counted once per ``dedup_id`` among the last
``_RECENT_IDS``, in case a copy outlived the duplicate window. Only the portfolio's latest
snapshot is followed on a core subscription: a missed one is replaced by the next.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import TypeVar

import httpx

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    SETTLEMENT_ASSET,
    AssetAmount,
    Candle,
    Fill,
    Message,
    OrderIntent,
    OrderUpdate,
    PortfolioSnapshot,
    Signal,
    SignedAssetAmount,
)

M = TypeVar("M", bound=Message)

_RECENT_IDS = 100_000


class _FirstSeen:
    """Whether a message id is new among the most recent ``capacity`` ids."""

    def __init__(self, capacity: int = _RECENT_IDS) -> None:
        self._capacity = capacity
        self._order: deque[str] = deque()
        self._ids: set[str] = set()

    def first(self, message: Message) -> bool:
        key = message.dedup_id
        if key in self._ids:
            return False
        self._ids.add(key)
        self._order.append(key)
        if len(self._order) > self._capacity:
            self._ids.discard(self._order.popleft())
        return True


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
        follow = self._follow
        return [
            follow(subjects.MARKET, subjects.CANDLE_PREFIX, Candle, self._on_candle),
            follow(subjects.SIGNALS, subjects.SIGNAL_PREFIX, Signal, self._on_signal),
            follow(subjects.ORDERS, subjects.ORDER_INTENT_PREFIX, OrderIntent, self._on_intent),
            follow(subjects.ORDERS, subjects.ORDER_UPDATE_PREFIX, OrderUpdate, self._on_update),
            follow(subjects.FILLS, subjects.FILL_PREFIX, Fill, self._on_fill),
            asyncio.create_task(
                self._bus.subscribe(
                    subjects.PORTFOLIO_SNAPSHOT,
                    PortfolioSnapshot,
                    self._on_snapshot,
                    label="observe-portfolio",
                ),
                name="observe-portfolio",
            ),
            asyncio.create_task(self._poll_health(), name="observe-health"),
        ]

    def _follow(
        self,
        stream: subjects.StreamSpec,
        prefix: str,
        kind: type[M],
        handler: Callable[[M], Awaitable[None]],
    ) -> asyncio.Task[None]:
        label = f"observe-{kind.KIND}"
        seen = _FirstSeen()

        async def once(message: M) -> None:
            if seen.first(message):
                await handler(message)

        follow = self._bus.replay(
            stream, subjects.all_of(prefix), kind, once, label=label, from_now=True
        )
        return asyncio.create_task(follow, name=label)

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


def _rounded(value: Decimal, places: int) -> Decimal:
    """Half away from zero, as the console rounds (format() alone rounds half to even)."""
    return value.quantize(Decimal(10) ** -places, rounding=ROUND_HALF_UP)


def _signed(value: Decimal, places: int = 2) -> str:
    return f"{_rounded(value, places):+,.{places}f}"


def _by_asset(amounts: tuple[AssetAmount | SignedAssetAmount, ...], *, sign: bool) -> str:
    """USDT to the cent, another asset (BNB) to 8 places, each in its own units."""
    shown = []
    for a in amounts:
        places = 2 if a.asset == SETTLEMENT_ASSET else 8
        text = _signed(a.amount, places) if sign else f"{_rounded(a.amount, places):,.{places}f}"
        shown.append(f"{text} {a.asset}")
    return ", ".join(shown) or "-"


def income_line(snapshot: PortfolioSnapshot) -> str:
    """What moved the account besides our trades' PnL: funding, transfers, other income, and
    the commissions by the asset they were paid in (testnet and live; 0 and - in paper)."""
    return (
        f"funding {_signed(snapshot.funding)}   transfers "
        f"{_by_asset(snapshot.transfers_by_asset, sign=True)}   other income "
        f"{_signed(snapshot.other_income)}   fees by asset "
        f"{_by_asset(snapshot.fees_by_asset, sign=False)}"
    )


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
            income_line(snapshot),
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
