"""What moves the account besides our fills reaches the portfolio's ledger exactly (testnet mode,
the local Binance-compatible server, real execution and portfolio processes on a real
nats-server).

Execution trades until the venue holds a position; the server then charges funding of both
signs (its admin call) and books transfers in and out, one in BNB. Execution reads the venue's
income history and publishes what no fill carries; the portfolio's snapshot must equal the
server's own records: funding in total and per symbol and transfers exactly, the wallet and the
equity to the cent (the policy's initial capital is the server's starting wallet: one account).
Then execution is stopped, the venue books more while it is down, and the restarted execution
publishes exactly that: every entry of the venue once on the stream, none lost, none repeated.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    # python-binance imports websockets' legacy client, deprecated at import time (not ours).
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance import Client

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    AccountEntry,
    PortfolioSnapshot,
    TradingState,
)
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.flow import flowing
from support.invariants import settle_portfolio
from support.ledger_check import last_snapshot
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
CAPITAL = "10000"
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "income-test"},
        "spec": {
            "mode": "testnet",
            "symbols": [SYMBOL],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxSlippageBps": 100},
            "paper": {"initialCapitalUsd": CAPITAL},
        },
    }
)
MARK = Decimal("30123.4")  # the venue's price and the last candle's close once trading stopped
TRADE_TYPES = ("REALIZED_PNL", "COMMISSION")  # the fills carry these
CENT = Decimal("0.01")


@pytest.fixture
def exchange() -> Iterator[SimAdmin]:
    config = SimConfig.from_dict(
        {
            "prices": {SYMBOL: "30000"},
            "balance": CAPITAL,
            # Funding only when the test charges it: the next scheduled time is centuries away.
            "funding_interval_ms": 10**13,
        }
    )
    with sim_in_thread(config) as url, SimAdmin(url) as admin:
        yield admin


def _execution(url: str, exchange_url: str, tmp_path: Path) -> Worker:
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = (
        *("--worker-id", "exec-income", "--exchange-url", exchange_url),
        # A round (the income, weight 30, and two account reads, 5 each) every 2 s is 1,200 of
        # the 2,400 weight a minute: every 0.5 s spent the minute's budget within about 40 s,
        # and a read then waited for the next minute, past this test's 20 s waits.
        *("--income-interval", "2"),
    )
    return start_worker("execution", nats_url=url, log_dir=tmp_path, args=args, env=env)


def _venue_entries(exchange: SimAdmin) -> list[dict[str, Any]]:
    """The server's own income records of our account that no fill carries."""
    return [
        e for e in exchange.income() if e["apiKey"] == KEY and e["incomeType"] not in TRADE_TYPES
    ]


def _total(entries: list[dict[str, Any]], income_type: str, asset: str = "USDT") -> Decimal:
    return sum(
        (
            Decimal(e["income"])
            for e in entries
            if e["incomeType"] == income_type and e["asset"] == asset
        ),
        Decimal(0),
    )


async def _venue_account(base_url: str) -> tuple[Decimal, Decimal]:
    """The venue's USDT wallet balance and unrealized PnL, over its REST API."""
    client = Client(KEY, SECRET, ping=False)
    client.FUTURES_URL = f"{base_url}/fapi"
    try:
        balances = await asyncio.to_thread(client.futures_account_balance)
        positions = await asyncio.to_thread(client.futures_position_information)
    finally:
        client.close_connection()
    (wallet,) = [Decimal(b["balance"]) for b in balances if b["asset"] == "USDT"]
    unrealized = sum((Decimal(p["unRealizedProfit"]) for p in positions), Decimal(0))
    return wallet, unrealized


async def _applied(url: str, entries: int, worker: Worker) -> PortfolioSnapshot:
    """The portfolio's snapshot once it has applied ``entries`` account entries."""
    found: list[PortfolioSnapshot] = []

    async def caught_up() -> bool:
        snapshot = await last_snapshot(url)
        found[:] = [snapshot] if snapshot is not None else []
        return snapshot is not None and snapshot.entries_applied >= entries

    await eventually(caught_up, timeout_s=20, what=f"{entries} entries applied", worker=worker)
    return found[0]


async def _trade_into_a_position(url: str, bus: Bus, exchange: SimAdmin, execution: Worker) -> None:
    async with flowing(bus):
        await eventually(
            lambda: len([o for o in exchange.orders() if o["status"] == "FILLED"]) >= 3,
            timeout_s=30,
            what="three orders filled at the exchange",
            worker=execution,
        )
    await settle_portfolio(url)
    # One price for both from here: the venue's mark and the portfolio's last candle.
    exchange.price(SYMBOL, MARK)
    start = int(time.time() * 1000) // 60_000 * 60_000
    candle = flat_candle(SYMBOL, MARK, open_time_ms=start)
    await bus.publish(subjects.candle_subject(SYMBOL), candle)


def _charge_funding_of_both_signs(exchange: SimAdmin) -> list[Decimal]:
    charged = []
    for rate in ("0.0001", "-0.00025"):
        exchange.funding_rate(SYMBOL, rate)
        (entry,) = exchange.settle_funding(SYMBOL)  # one open position: one entry
        charged.append(Decimal(entry["income"]))
    return charged


def _check_against_the_venue(
    snapshot: PortfolioSnapshot, venue: list[dict[str, Any]], wallet: Decimal, unrealized: Decimal
) -> None:
    funding = _total(venue, "FUNDING_FEE")
    assert snapshot.funding == funding
    (position,) = [p for p in snapshot.positions if p.symbol == SYMBOL]
    assert position.funding == funding
    assert snapshot.transfers == _total(venue, "TRANSFER")
    bnb = {a.asset: a.amount for a in snapshot.transfers_by_asset}.get("BNB")
    assert bnb == _total(venue, "TRANSFER", "BNB")
    assert abs(snapshot.wallet - wallet) < CENT, (snapshot.wallet, wallet)
    assert abs(snapshot.equity - (wallet + unrealized)) < CENT, (snapshot.equity, wallet)
    print(
        f"\nfunding {snapshot.funding} (venue {funding}), transfers {snapshot.transfers}, "
        f"wallet {snapshot.wallet} (venue {wallet}), equity {snapshot.equity} "
        f"(venue {wallet + unrealized})"
    )


async def test_funding_and_transfers_reach_the_ledger_exactly_and_a_restart_loses_none(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    execution = _execution(url, exchange.base_url, tmp_path)
    workers.append(execution)
    try:
        await _trade_into_a_position(url, bus, exchange, execution)
        long_pays, short_pays = _charge_funding_of_both_signs(exchange)
        assert long_pays * short_pays < 0, "funding of both signs"
        exchange.transfer(KEY, "USDT", "250")
        exchange.transfer(KEY, "USDT", "-100.5")
        exchange.transfer(KEY, "BNB", "0.5")
        venue = _venue_entries(exchange)
        snapshot = await _applied(url, len(venue), execution)
        _check_against_the_venue(snapshot, venue, *await _venue_account(exchange.base_url))

        execution.stop()  # the venue books more while execution is down
        exchange.funding_rate(SYMBOL, "0.0003")
        exchange.settle_funding(SYMBOL)
        exchange.transfer(KEY, "USDT", "42")
        restarted = _execution(url, exchange.base_url, tmp_path)
        workers.append(restarted)
        venue = _venue_entries(exchange)
        snapshot = await _applied(url, len(venue), restarted)
        _check_against_the_venue(snapshot, venue, *await _venue_account(exchange.base_url))
        outcome = "qtrader_account_entries_total"
        assert restarted.metric(outcome, outcome="published") == 2  # what it missed, no more
        assert restarted.metric(outcome, outcome="duplicate") == 0  # none published again
        stored = await read_all(
            url,
            stream=subjects.FILLS.name,
            subject=subjects.ACCOUNT_ENTRY,
            message_type=AccountEntry,
        )
        ids = Counter(entry.entry_id for entry in stored)
        assert set(ids) == {f"{e['incomeType']}:{e['tranId']}" for e in venue}
        assert set(ids.values()) == {1}
        assert restarted.dependency("account-entries")["status"] == "OK"
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()
