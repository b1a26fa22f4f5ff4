"""A trip that flattens closes what its first order left open, or says it could not.

Two real execution workers in testnet mode (python-binance over HTTP) and a portfolio on a real
nats-server, trading on the local Binance-compatible server in its own process. LONG signals
open a position; the feed stops, the venue is made hostile, and the stop is tripped with
``flattenOnTrip`` as ``qtrader ess trip`` does it (local mode's control plane, in-process):

* a thin book: the venue fills only half of each of the next three orders, so the trip's first
  intent (three attempts: the order, then twice its remainder) leaves an eighth of the position
  open; a second round must close it;
* a price gone: the venue's price is 5% under the last candle, beyond the policy's 1% slippage
  bound, and no newer candle comes; every round expires unfilled, and when the rounds are spent
  each worker's ``/health`` says which position the trip left open.

Verdicts come from the venue's own records (positions, the exposure checker) and the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Direction, OrderIntent, OrderStatus, OrderUpdate, Signal
from qtrader.contracts.policy import parse_policy
from qtrader.control.ess_resource import parse_emergency_stop
from qtrader.execution.decisions import FLATTEN_ROUNDS, flatten_intent_id
from qtrader.local import ess_client
from qtrader.local.control import heartbeat_forever, publish_policy
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from qtrader_tools.simulators.binance_futures import SimAdmin
from qtrader_tools.stress.invariants import ExposureLimits, check_exposure, from_sim_records
from support.binance_sim import KEY, SECRET, sim_listing, sim_process
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
PRICE = Decimal(30_000)
MAX_POSITION_USD = Decimal(1000)
WORKERS = ("rounds-1", "rounds-2")


@contextlib.contextmanager
def _exchange(tmp_path: Path) -> Iterator[SimAdmin]:
    with (
        sim_process({"prices": {SYMBOL: str(PRICE)}}, tmp_path / "sim") as url,
        SimAdmin(url) as admin,
    ):
        yield admin


def _policy() -> Any:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "flatten-rounds"},
            "spec": {
                "mode": "testnet",
                "symbols": [SYMBOL],
                "risk": {
                    "minConfidence": 0.0,
                    "maxPositionUsd": str(MAX_POSITION_USD),
                    "maxSlippageBps": 100,
                },
            },
        }
    )


def _stop() -> Any:
    return parse_emergency_stop(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "EmergencyStop",
            "metadata": {"name": "main"},
            "spec": {"cooldownSeconds": 60, "flattenOnTrip": True},
        }
    )


async def _open_long(bus: Bus, admin: SimAdmin) -> Decimal:
    """Candles and LONG signals until the venue holds a long position; then the feed stops."""
    index = 0
    deadline = time.monotonic() + 30
    while _venue_position(admin) <= 0:
        assert time.monotonic() < deadline, "no long position at the venue after 30 s"
        open_ms = 1_700_000_000_000 + index * 60_000
        await bus.publish(
            subjects.candle_subject(SYMBOL), flat_candle(SYMBOL, PRICE, open_time_ms=open_ms)
        )
        signal = Signal(
            signal_id=f"rounds:{index}",
            symbol=SYMBOL,
            direction=Direction.LONG,
            confidence=0.9,
            model_version="test",
            candle_open_time_ms=open_ms,
            price=PRICE,
            created_at_ms=int(time.time() * 1000),
        )
        await bus.publish(subjects.signal_subject(SYMBOL), signal)
        index += 1
        await asyncio.sleep(0.1)
    return _venue_position(admin)


def _venue_position(admin: SimAdmin) -> Decimal:
    """The venue's own position in SYMBOL, from its trades."""
    return sum(
        (Decimal(t["qty"]) * (1 if t["side"] == "BUY" else -1) for t in admin.trades()),
        Decimal(0),
    )


@contextlib.asynccontextmanager
async def _stack(
    nats: EmbeddedNats, admin: SimAdmin, tmp_path: Path
) -> AsyncIterator[tuple[Bus, list[Worker]]]:
    bus = Bus(url=nats.url, client_name="test-flatten-rounds")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, _policy())
    control = LocalControlPlane(bus, resource=_stop(), interval_s=0.2)
    await control.start()
    tasks = [
        asyncio.create_task(control.run()),
        asyncio.create_task(heartbeat_forever(bus, issued_by="control-plane", interval_s=0.2)),
    ]
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = ("--exchange-url", admin.base_url, "--unknown-grace", "1", "--exchange-timeout", "2")
    workers = [start_worker("portfolio", nats_url=nats.url, log_dir=tmp_path)]
    try:
        for worker_id in WORKERS:
            workers.append(
                start_worker(
                    "execution",
                    nats_url=nats.url,
                    log_dir=tmp_path,
                    args=("--worker-id", worker_id, *args),
                    env=env,
                )
            )
        yield bus, workers[1:]
    finally:
        await stop_pipeline(workers, nats_url=nats.url)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()


async def _trip(bus: Bus) -> int:
    outcome = await ess_client.trip(
        bus, name="main", reason="test rounds", mode=None, tripped_by="test", timeout_s=10
    )
    return outcome.record.ess_status().latch_revision


async def _flatten_intents(url: str, revision: int) -> dict[str, OrderIntent]:
    intents = await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.intent.*", message_type=OrderIntent
    )
    rounds = {flatten_intent_id(revision, SYMBOL, r): r for r in range(FLATTEN_ROUNDS)}
    found = [i for i in intents if i.intent_id in rounds]
    assert len({i.intent_id for i in found}) == len(found), "a round's intent stored twice"
    return {i.intent_id: i for i in found}


def _judge_exposure(admin: SimAdmin) -> None:
    """The shared exposure checker on the venue's own records."""
    trades, rejections = from_sim_records(
        trades=admin.trades(), orders=admin.orders(), log=admin.log()
    )
    limits = ExposureLimits(
        max_position_usd=MAX_POSITION_USD,
        max_open_positions=1,
        step_sizes={SYMBOL: sim_listing(admin).instrument(SYMBOL).step_size},
    )
    report = check_exposure(trades=trades, rejections=rejections, limits=limits)
    assert report.ok, report.summary()
    assert report.reduce_only_rejections == 0


async def test_a_thin_book_leaves_part_of_the_position_and_the_next_round_closes_it(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    with _exchange(tmp_path) as admin:
        async with _stack(nats_server, admin, tmp_path) as (bus, workers):
            opened = await _open_long(bus, admin)
            await asyncio.sleep(1.0)  # the last fills reach both replicas' books
            # Half of each of the next three orders: the first round's three attempts.
            admin.partial(SYMBOL, "0.5", 3)
            revision = await _trip(bus)
            await eventually(
                lambda: _venue_position(admin) == 0,
                timeout_s=20,
                what=f"the venue's position of {opened} closed",
            )
            intents = await _flatten_intents(nats_server.url, revision)
            assert len(intents) >= 2, sorted(intents)  # the first round left some open
            for worker in workers:
                await eventually(
                    lambda w=worker: (
                        w.dependency("flatten").get("detail")  # type: ignore[misc]
                        == f"latch {revision}: every position closed"
                    ),
                    timeout_s=5,
                    what="flatten: every position closed",
                    worker=worker,
                )
                assert worker.dependency("flatten")["status"] == "OK"
        updates = await read_all(
            nats_server.url,
            stream="QT_ORDERS",
            subject="qtrader.order.update.*",
            message_type=OrderUpdate,
        )
        first = flatten_intent_id(revision, SYMBOL)
        ended = [u for u in updates if u.intent_id == first and u.status.is_final]
        assert [u.status for u in ended] == [OrderStatus.CANCELED]  # filled in part
        assert all(i.reduce_only and i.side.value == "SELL" for i in intents.values())
        _judge_exposure(admin)


async def test_a_price_beyond_the_bound_spends_the_rounds_and_health_names_what_is_open(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    with _exchange(tmp_path) as admin:
        async with _stack(nats_server, admin, tmp_path) as (bus, workers):
            opened = await _open_long(bus, admin)
            await asyncio.sleep(1.0)
            admin.price(SYMBOL, PRICE * Decimal("0.95"))  # no candle says so
            revision = await _trip(bus)
            for worker in workers:
                await eventually(
                    lambda w=worker: w.dependency("flatten").get("status") == "DEGRADED",  # type: ignore[misc]
                    timeout_s=40,
                    what="flatten DEGRADED once the rounds are spent",
                    worker=worker,
                )
                detail = str(worker.dependency("flatten")["detail"])
                assert f"latch {revision}" in detail, detail
                assert f"{SYMBOL} {opened}" in detail, detail
                assert worker.metric("qtrader_flatten_unfinished_positions") == 1
            intents = await _flatten_intents(nats_server.url, revision)
            assert sorted(intents) == sorted(
                flatten_intent_id(revision, SYMBOL, r) for r in range(FLATTEN_ROUNDS)
            )
            assert _venue_position(admin) == opened  # nothing filled beyond the bound
        _judge_exposure(admin)
