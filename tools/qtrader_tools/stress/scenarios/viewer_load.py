"""Live viewer load: 500 events in 10 s to several WebSocket viewers, one of them slow.

A real portfolio worker serves the viewers (``/events`` on its HTTP port). The scenario connects
four fast viewers and one slow one (a 4 KiB socket receive buffer, reading one batch every
50 ms, slower than batches come), then publishes 500 events on NATS in 10 s:
order updates to the ORDERS stream, fills to FILLS (which the portfolio also books, so its
snapshots join the stream), risk alerts to RISK; 400 of them paced evenly, the last 100 in four
bursts of 25. Throughout, it polls the worker's ``/health``.

Criteria (from what the viewers received and the worker's ``/viewer/stats``):
- each fast viewer got each of the 500 events exactly once and, within each kind (order
  updates, fills, alerts: one subscription each), in publish order, none dropped;
- every viewer's batch numbers are contiguous (a gap would be a lost message);
- every viewer can account for every event the server handed it: received plus reported
  dropped equals the server's own count for that viewer (sent plus dropped, nothing left
  queued), so a drop is never silent;
- the slow viewer did fall behind (its last event came >= 1 s after the last publish) while the
  fast ones were not held back (theirs within 1 s), and the drops it was told of equal what the
  server counted for it. (In 10 s, compressed 500 events fit in the socket buffers, so the hub
  need not drop for it; the drop-oldest queue under a stalled viewer is tested in
  ``tests/integration/test_viewer_ws.py`` with incompressible events);
- no viewer got more than 50 batches in any one second (the cap, plus one for the window
  edge), and the bursts were batched (fast viewers: more events than batches);
- the worker stayed healthy (``/health`` answered and was not CRITICAL at every poll) and its
  ledger booked every fill (the pipeline did not slow down for the viewers).

Scale does not apply: 500 events in 10 s is the requirement; the run takes about 20 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Fill,
    Message,
    OrderStatus,
    OrderUpdate,
    RiskAlert,
    RiskAlertKind,
    Side,
)
from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import Rig, ScenarioFailure, policy_document
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions

EVENTS = 500
PACED = 400
PUBLISH_OVER_S = 10.0
BURSTS = 4
FAST_VIEWERS = 4
CAP_PER_S = 50  # the hub's default max_batches_per_s
SLOW_READ_EVERY_S = 0.05  # 20 batches/s: slower than the ~37/s the fast ones get
DRAIN_TIMEOUT_S = 60.0
QUIET_S = 1.5  # no new event for this long: the portfolio's last snapshot is out


@dataclass
class Viewer:
    name: str
    seqs: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the scenario's events, in arrival order
    events: int = 0  # every event, the portfolio's own snapshots included
    dropped: int = 0
    at: list[float] = field(default_factory=list)
    last_key_at: float = 0.0  # when the newest of the scenario's events arrived
    peer: str = ""  # this viewer's address as the server sees it ("host:port")
    out_of_band: int = 0  # messages outside the batches (seq 0): the state on connect, keep-alives

    @property
    def accounted(self) -> int:
        return self.events + self.dropped

    def max_batches_in_a_second(self) -> int:
        most, start = 0, 0
        for end, at in enumerate(self.at):
            while at - self.at[start] >= 1.0:
                start += 1
            most = max(most, end - start + 1)
        return most


@dataclass(frozen=True)
class Lags:
    """How long after the last publish each kind of viewer had the last event."""

    fast_s: float
    slow_s: float


def run(options: StressOptions, result: ScenarioResult) -> None:
    asyncio.run(_run(options, result))


async def _run(options: StressOptions, result: ScenarioResult) -> None:
    async with Rig(options.work_dir) as rig:
        await rig.publish_policy(policy_document("viewer-load", symbols=["BTCUSDT"]))
        portfolio = rig.workload("portfolio")
        # /viewer/stats answers once the portfolio role exists (its routes are added then), and
        # says "fed" once the server has the feed's subscriptions (events before then reach no
        # viewer: they watch the present).
        await rig.wait_healthy([portfolio], path="/viewer/stats")
        await rig.until(
            lambda: _fed(rig, portfolio), timeout_s=30, what="the viewer feed's subscriptions"
        )
        url = portfolio.base_url.replace("http://", "ws://") + "/events"
        async with contextlib.AsyncExitStack() as stack:
            fast = [await stack.enter_async_context(connect(url)) for _ in range(FAST_VIEWERS)]
            slow = await stack.enter_async_context(
                connect(url, sock=_slow_socket(portfolio), max_queue=1)
            )
            await rig.until(
                lambda: _clients(rig, portfolio, FAST_VIEWERS + 1),
                timeout_s=10,
                what="the viewers attached",
            )
            before = await _stats(rig, portfolio)
            views = [Viewer(f"fast-{n}") for n in range(1, FAST_VIEWERS + 1)]
            slow_view = Viewer("slow")
            readers = [asyncio.create_task(_read(ws, v)) for ws, v in zip(fast, views, strict=True)]
            readers.append(asyncio.create_task(_read(slow, slow_view, every_s=SLOW_READ_EVERY_S)))
            polls: list[str] = []
            health = asyncio.create_task(_poll_health(rig, portfolio, polls))
            options.say("viewer-load: publishing 500 events in 10 s")
            sent, published_at = await _publish(rig)
            health.cancel()
            await asyncio.gather(health, return_exceptions=True)
            await _drain(rig, portfolio, [*views, slow_view], readers, before)
            stats = await _stats(rig, portfolio)
            fills_booked = await rig.metric(portfolio, "qtrader_portfolio_fills_applied_total")
        lags = Lags(
            fast_s=max(v.last_key_at for v in views) - published_at,
            slow_s=slow_view.last_key_at - published_at,
        )
        _judge(result, sent, views, slow_view, stats, before, polls, fills_booked, lags)


# --- the events ---------------------------------------------------------------------------------


def _events() -> list[tuple[str, Message]]:
    """500 events: order updates, fills and risk alerts, each with its own key."""
    now_ms = int(time.time() * 1000)
    out: list[tuple[str, Message]] = []
    for i in range(EVENTS):
        kind = i % 10
        if kind < 7:
            update = OrderUpdate(
                client_order_id=f"qt-viewer-{i}",
                intent_id=f"viewer-{i}",
                symbol="BTCUSDT",
                side=Side.BUY if i % 2 else Side.SELL,
                status=OrderStatus.NEW,
                quantity=Decimal("0.001"),
                filled_quantity=Decimal(0),
                avg_price=Decimal(0),
                exchange="stress",
                ts_ms=now_ms + i,
            )
            out.append((subjects.order_update_subject("BTCUSDT"), update))
        elif kind < 9:
            fill = Fill(
                fill_id=f"viewer-{i}",
                client_order_id=f"qt-viewer-{i}",
                symbol="BTCUSDT",
                side=Side.BUY if i % 4 < 2 else Side.SELL,
                quantity=Decimal("0.001"),
                price=Decimal("50000.0"),
                fee=Decimal("0.02"),
                ts_ms=now_ms + i,
            )
            out.append((subjects.fill_subject("BTCUSDT"), fill))
        else:
            alert = RiskAlert(
                alert_id=f"viewer-{i}",
                alert_kind=RiskAlertKind.EXECUTION_ERROR_RATE,
                source="stress/viewer-load",
                value=Decimal(0),
                threshold=Decimal(1),
                detail="a viewer-load event (no stop is watching)",
                ts_ms=now_ms + i,
            )
            out.append((subjects.risk_alert_subject(alert.alert_kind.value), alert))
    return out


def _key(event: dict[str, Any]) -> str | None:
    """The scenario's identity of a received event; None for the portfolio's snapshots."""
    if event.get("kind") == "order_update":
        return str(event["client_order_id"])
    if event.get("kind") == "fill":
        return f"fill:{event['fill_id']}"
    if event.get("kind") == "risk_alert":
        return f"alert:{event['alert_id']}"
    return None


def _by_kind(keys: list[str]) -> dict[str, list[str]]:
    """Keys in arrival order, per kind of event. Order is promised within a kind, not across:
    NATS orders what one subscription delivers, and the viewer feed subscribes once per kind
    (order updates, fills, alerts come from different streams and, in a stack, processes)."""
    kinds: dict[str, list[str]] = {}
    for key in keys:
        kinds.setdefault(key.split(":", 1)[0] if ":" in key else "order", []).append(key)
    return kinds


def _sent_key(message: Message) -> str:
    if isinstance(message, OrderUpdate):
        return message.client_order_id
    if isinstance(message, Fill):
        return f"fill:{message.fill_id}"
    assert isinstance(message, RiskAlert)
    return f"alert:{message.alert_id}"


async def _publish(rig: Rig) -> tuple[list[Message], float]:
    """400 events evenly over 8 s, then 4 bursts of 25 over the last 2 s; returns them and
    when the last went out."""
    events = _events()
    paced_over = PUBLISH_OVER_S * PACED / EVENTS
    start = time.monotonic()
    for i, (subject, message) in enumerate(events[:PACED]):
        await rig.bus.publish(subject, message)
        await _sleep_until(start + (i + 1) * paced_over / PACED)
    burst = (EVENTS - PACED) // BURSTS
    for b in range(BURSTS):
        for subject, message in events[PACED + b * burst : PACED + (b + 1) * burst]:
            await rig.bus.publish(subject, message)
        last_at = time.monotonic()
        if b < BURSTS - 1:
            await _sleep_until(
                start + paced_over + (b + 1) * (PUBLISH_OVER_S - paced_over) / BURSTS
            )
    return [message for _, message in events], last_at


async def _sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))


# --- the viewers --------------------------------------------------------------------------------


def _slow_socket(worker: Child) -> socket.socket:
    """A connected socket with a tiny receive buffer: TCP pushes back on the server quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", worker.port))
    sock.setblocking(False)
    return sock


async def _read(ws: ClientConnection, view: Viewer, *, every_s: float = 0.0) -> None:
    """Read batches until cancelled (the scenario stops readers once they have caught up)."""
    host, port = ws.local_address[:2]
    view.peer = f"{host}:{port}"
    while True:
        batch = json.loads(await ws.recv())
        if batch["seq"] == 0:  # the state on connect, a keep-alive: outside the batches
            view.out_of_band += 1
            continue
        view.at.append(time.monotonic())
        view.seqs.append(batch["seq"])
        view.dropped += batch["dropped"]
        view.events += len(batch["events"])
        keys = [k for k in map(_key, batch["events"]) if k is not None]
        if keys:
            view.keys += keys
            view.last_key_at = view.at[-1]
        if every_s:
            await asyncio.sleep(every_s)


async def _drain(
    rig: Rig,
    worker: Child,
    views: list[Viewer],
    readers: list[asyncio.Task[None]],
    before: dict[str, Any],
) -> None:
    """Wait until the hub has been quiet for QUIET_S (the portfolio's last snapshots are out)
    and every viewer accounted for every event it published (or the timeout)."""
    last: list[tuple[int, float]] = []  # (hub's published count, when first seen)

    async def caught_up() -> bool:
        published = (await _stats(rig, worker))["published"] - before["published"]
        crashed = [r for r in readers if r.done()]
        if crashed:
            raise ScenarioFailure(f"a viewer's connection ended: {crashed[0].exception()!r}")
        if not last or last[-1][0] != published:
            last.append((published, time.monotonic()))
        quiet = time.monotonic() - last[-1][1] >= QUIET_S
        return quiet and all(v.accounted >= published for v in views)

    try:
        await rig.until(caught_up, timeout_s=DRAIN_TIMEOUT_S, what="the viewers to catch up")
    except ScenarioFailure as exc:
        stats = await _stats(rig, worker)
        published = stats["published"] - before["published"]
        counts = ", ".join(f"{v.name} {v.accounted}" for v in views)
        raise ScenarioFailure(
            f"{exc}: hub published {published}; accounted {counts}; server {stats['per_client']}"
        ) from exc
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def _fed(rig: Rig, worker: Child) -> bool:
    return bool((await _stats(rig, worker))["fed"])


async def _clients(rig: Rig, worker: Child, count: int) -> bool:
    return int((await _stats(rig, worker))["clients"]) >= count


async def _stats(rig: Rig, worker: Child) -> dict[str, Any]:
    body: dict[str, Any] = (await rig.http.get(worker.base_url + "/viewer/stats")).json()
    return body


async def _poll_health(rig: Rig, worker: Child, polls: list[str]) -> None:
    """The worker's /health status every 250 ms ("unreachable" when it did not answer)."""
    while True:
        try:
            polls.append(str((await rig.health(worker))["status"]))
        except Exception as exc:  # any failure to answer is what this records
            polls.append(f"unreachable ({type(exc).__name__})")
        await asyncio.sleep(0.25)


# --- the verdict --------------------------------------------------------------------------------


def _judge(
    result: ScenarioResult,
    sent: list[Message],
    views: list[Viewer],
    slow: Viewer,
    stats: dict[str, Any],
    before: dict[str, Any],
    polls: list[str],
    fills_booked: float,
    lags: Lags,
) -> None:
    expected = _by_kind([_sent_key(m) for m in sent])
    published = int(stats["published"]) - int(before["published"])
    fast_exact = sum(_by_kind(v.keys) == expected for v in views)
    fast_dropped = sum(v.dropped for v in views)
    server_slow = _server_dropped(stats, len(views))
    seq_gaps = sum(_gaps(v.seqs) for v in [*views, slow])
    unaccounted = _unaccounted([*views, slow], stats)
    busiest = max(v.max_batches_in_a_second() for v in [*views, slow])
    batched = sum(v.events > len(v.seqs) for v in views)
    unhealthy = sum(not p.startswith(("OK", "DEGRADED")) for p in polls)
    fills = sum(isinstance(m, Fill) for m in sent)
    result.figures.update(
        {
            "events_published_by_scenario": len(sent),
            "events_published_by_hub": published,
            "fast_viewers": len(views),
            "batches_per_fast_viewer": [len(v.seqs) for v in views],
            "slow_viewer_batches": len(slow.seqs),
            "slow_viewer_events": slow.events,
            "slow_viewer_dropped": slow.dropped,
            "slow_viewer_dropped_by_server": server_slow,
            "max_batches_in_one_second": busiest,
            "fast_viewers_last_event_after_publish_s": round(lags.fast_s, 3),
            "slow_viewer_last_event_after_publish_s": round(lags.slow_s, 3),
            "health_polls": len(polls),
            "health_states": sorted(set(polls)),
            "fills_booked": fills_booked,
        }
    )
    result.check(
        "fast viewers with every event once, in order within its kind", fast_exact, "==", len(views)
    )
    result.notes += [f"{v.name}: {d}" for v in views if (d := _difference(expected, v.keys))]
    result.check("events dropped for fast viewers", fast_dropped, "==", 0)
    result.check("batch number gaps (all viewers)", seq_gaps, "==", 0)
    result.check("events neither received nor reported dropped", unaccounted, "==", 0)
    told = sum(v.out_of_band >= 1 for v in [*views, slow])
    result.check("viewers told the state on connect", told, "==", len(views) + 1)
    result.check(
        "slow viewer behind by (last event after the last publish)", lags.slow_s, ">=", 1.0, "s"
    )
    result.check(
        "fast viewers behind by (not held back by the slow one)", lags.fast_s, "<=", 1.0, "s"
    )
    result.check(
        "slow viewer's reported drops minus the server's count",
        None if server_slow is None else slow.dropped - server_slow,
        "==",
        0,
    )
    result.check("most batches to one viewer in one second", busiest, "<=", CAP_PER_S + 1)
    result.check("fast viewers whose bursts were batched", batched, "==", len(views))
    result.check("health polls", len(polls), ">=", int(PUBLISH_OVER_S * 2))
    result.check("health polls CRITICAL or unanswered", unhealthy, "==", 0)
    result.check("fills booked by the portfolio", fills_booked, "==", fills)


def _difference(expected: dict[str, list[str]], keys: list[str]) -> str:
    """What a viewer got that differs from what was sent, per kind: missing, unexpected,
    duplicated keys or the first one out of order; "" when it got exactly what was sent."""
    got = _by_kind(keys)
    parts = []
    for kind in sorted(set(expected) | set(got)):
        want, have = expected.get(kind, []), got.get(kind, [])
        if want == have:
            continue
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        duplicated = len(have) - len(set(have))
        first = next((i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b), None)
        where = (
            ""
            if first is None
            else f", first out of order at {first}: {have[first - 1 : first + 2]}"
        )
        parts.append(
            f"{kind}: {len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]},"
            f" {duplicated} duplicated{where}"
        )
    return "; ".join(parts)


def _unaccounted(views: list[Viewer], stats: dict[str, Any]) -> int | None:
    """Events the server handed to a viewer (sent, or dropped and reported) that the viewer
    did not account for, or the other way round, summed; None if a viewer is not in the stats.
    Per client, from the server's own count since that client attached: the hub's total also
    counts events published before a viewer attached."""
    by_peer = {str(c["peer"]): c for c in stats["per_client"]}
    total = 0
    for view in views:
        server = by_peer.get(view.peer)
        if server is None:
            return None
        total += abs(view.accounted - (int(server["sent_events"]) + int(server["dropped"])))
        total += int(server["queued"])  # still queued after the quiet: not delivered
    return total


def _gaps(seqs: list[int]) -> int:
    return sum(1 for before, after in itertools.pairwise(seqs) if after != before + 1)


def _server_dropped(stats: dict[str, Any], fast: int) -> int | None:
    """The server's drop count of the slow viewer: the one client with the most drops."""
    per_client = sorted(stats["per_client"], key=lambda c: c["dropped"])
    return int(per_client[-1]["dropped"]) if len(per_client) > fast else None
