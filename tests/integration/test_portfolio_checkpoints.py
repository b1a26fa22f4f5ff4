"""The portfolio never skips a fill or an account entry silently, and starts from its
checkpoints.

Real portfolio processes on a real nats-server; the test publishes the fills and the account
entries (it plays the venue and execution's reading of its income) and reads back what the
portfolio wrote: snapshots, checkpoints, risk alerts, /health.
"""

from __future__ import annotations

import asyncio
import socket
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    AccountEntry,
    Fill,
    IncomeType,
    PortfolioCheckpoint,
    PortfolioSnapshot,
    RiskAlert,
    RiskAlertKind,
    Side,
    account_entry_id,
)
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import publish_policy
from qtrader.local.nats_server import EmbeddedNats
from support.ledger_check import last_snapshot
from support.streams import publish_raw, purge_stream, read_all, read_decodable
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

CAPITAL = Decimal(10_000)
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "checkpoint-test"},
        "spec": {"symbols": ["BTCUSDT", "ETHUSDT"], "paper": {"initialCapitalUsd": str(CAPITAL)}},
    }
)


def venue_fill(index: int, *, quantity: str | None = None) -> Fill:
    """Fills as a venue reports them: off the paper grid at times, some fees in BNB (half of
    them with their USDT value, half without)."""
    symbol = "BTCUSDT" if index % 3 else "ETHUSDT"
    price = Decimal(30_000 if symbol == "BTCUSDT" else 2_000) + Decimal(index % 17) / 1_000
    amount = Decimal(quantity or f"0.0{1 + index % 7}5")
    fee, asset, value = (price * amount / 2_500).quantize(Decimal("1e-8")), "USDT", None
    if index % 5 == 0:
        asset, fee = "BNB", (fee / 600).quantize(Decimal("1e-8"))
        value = None if index % 10 else (fee * 600).quantize(Decimal("1e-8"))
    return Fill(
        fill_id=f"venue-{index}",
        client_order_id=f"qt-venue-{index}",
        symbol=symbol,
        side=Side.BUY if index % 4 < 2 else Side.SELL,
        quantity=amount,
        price=price,
        fee=fee,
        fee_asset=asset,
        fee_usdt=value,
        ts_ms=1_700_000_000_000 + index,
    )


# Every seventh message an account entry: funding of both signs, transfers in and out, in BNB
# too (kept in BNB), and other income.
ENTRY_KINDS = [
    (IncomeType.FUNDING_FEE, "USDT", "-0.41250000"),
    (IncomeType.FUNDING_FEE, "USDT", "0.12345678"),
    (IncomeType.TRANSFER, "USDT", "250"),
    (IncomeType.TRANSFER, "USDT", "-75.5"),
    (IncomeType.TRANSFER, "BNB", "0.5"),
    (IncomeType.FUNDING_FEE, "BNB", "-0.00001"),
    (IncomeType.COMMISSION_REBATE, "USDT", "0.03"),
]


def venue_entry(index: int) -> AccountEntry:
    kind, asset, amount = ENTRY_KINDS[index % len(ENTRY_KINDS)]
    return AccountEntry(
        entry_id=account_entry_id(kind, str(9_000 + index)),
        income_type=kind,
        symbol="BTCUSDT" if kind is IncomeType.FUNDING_FEE else None,
        asset=asset,
        amount=Decimal(amount),
        ts_ms=1_700_000_000_000 + index,
    )


def with_entries(fills: list[Fill]) -> list[Fill | AccountEntry]:
    stream: list[Fill | AccountEntry] = []
    for index, fill in enumerate(fills, start=1):
        stream.append(fill)
        if index % 7 == 0:
            stream.append(venue_entry(index // 7))
    return stream


async def publish(bus: Bus, messages: list[Fill] | list[Fill | AccountEntry]) -> None:
    for message in messages:
        if isinstance(message, Fill):
            await bus.publish(subjects.fill_subject(message.symbol), message)
        else:
            await bus.publish(subjects.ACCOUNT_ENTRY, message)


async def checkpoints(url: str) -> list[PortfolioCheckpoint]:
    """The stored checkpoints that decode (a test stores junk among them)."""
    stored, _ = await read_decodable(
        url,
        stream=subjects.CHECKPOINTS.name,
        subject=subjects.PORTFOLIO_CHECKPOINT,
        message_type=PortfolioCheckpoint,
    )
    return stored


async def checkpoint_through(url: str, sequence: int, *, source: str) -> PortfolioCheckpoint:
    """The checkpoint ``source`` wrote covering FILLS through ``sequence`` (waits for it)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        for checkpoint in await checkpoints(url):
            if checkpoint.source == source and checkpoint.fills_through == sequence:
                return checkpoint
        assert asyncio.get_running_loop().time() < deadline, f"no checkpoint at {sequence}"
        await asyncio.sleep(0.2)


def source_of(worker: Worker) -> str:
    """Who wrote a checkpoint: the worker id is ``<host>-<pid>`` (``runtime.WorkerOptions``)."""
    return f"portfolio/{socket.gethostname()}-{worker.process.pid}"


async def started(worker: Worker) -> str:
    """The ledger's /health detail once the worker has read the policy and its checkpoints
    (its /healthz answers before it has connected to NATS)."""
    await eventually(
        lambda: worker.dependency("ledger").get("detail") != "waiting for policy",
        timeout_s=15,
        what="the portfolio started",
        worker=worker,
    )
    return str(worker.dependency("ledger")["detail"])


def exact(checkpoint: PortfolioCheckpoint) -> bytes:
    """Every figure of the ledger, as text (exponents included): only who and when left out."""
    return checkpoint.model_copy(update={"source": "", "ts_ms": 0}).encode()


async def connect(url: str) -> Bus:
    bus = Bus(url=url, client_name="test-checkpoints")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    return bus


@pytest.mark.invariants_exempt(
    "exposure", "orders", reason="the test plays the venue: its fills belong to no order"
)
async def test_restart_mid_burst_from_a_checkpoint_equals_a_full_replay_exactly(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await connect(url)
    fills = with_entries([venue_fill(i) for i in range(1, 1_201)])
    entries = sum(1 for m in fills if isinstance(m, AccountEntry))
    first = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    workers = [first]
    try:
        await publish(bus, fills[:400])
        # A checkpoint inside the burst, then a SIGKILL while fills are still coming.
        await checkpoint_through(url, 400, source=source_of(first))
        burst = asyncio.create_task(publish(bus, fills[400:]))
        await asyncio.sleep(0.3)
        first.stop(kill=True)
        await burst

        restarted = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
        workers.append(restarted)
        detail = await started(restarted)
        assert "restored the checkpoint through FILLS sequence" in detail
        assert "through FILLS sequence 0" not in detail
        tail = await checkpoint_through(url, len(fills), source=source_of(restarted))
        restarted.stop()

        # The same stream, no checkpoint: a full replay from the first fill.
        await purge_stream(url, subjects.CHECKPOINTS.name)
        clean = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
        workers.append(clean)
        assert "no checkpoint yet" in await started(clean)
        full = await checkpoint_through(url, len(fills), source=source_of(clean))
        clean.stop()
    finally:
        for worker in workers:
            worker.stop()
        await bus.close()
    assert tail.fills_applied == full.fills_applied == len(fills) - entries
    assert tail.entries_applied == full.entries_applied == entries
    assert exact(tail) == exact(full)
    assert {a.asset for a in full.unvalued_fees} == {"BNB"}  # some BNB fees have no USDT value
    assert {a.asset for a in full.unvalued_income} == {"BNB"}  # BNB funding is not valued
    assert full.funding_usdt != 0
    assert full.transfers_usdt != 0


@pytest.mark.invariants_exempt(
    "exposure", "orders", reason="the test plays the venue: its fills belong to no order"
)
async def test_start_when_newest_checkpoint_does_not_decode_then_falls_back_and_says_so(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await connect(url)
    fills = [venue_fill(i) for i in range(1, 101)]
    first = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    workers = [first]
    try:
        await publish(bus, fills[:60])
        good = await checkpoint_through(url, 60, source=source_of(first))
        first.stop()
        await publish(bus, fills[60:])
        await publish_raw(url, subjects.PORTFOLIO_CHECKPOINT, b'{"kind": "portf', msg_id="junk")

        second = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
        workers.append(second)
        await started(second)
        ledger = second.dependency("ledger")
        assert ledger["status"] == "DEGRADED", ledger
        assert "restored the checkpoint through FILLS sequence 60" in str(ledger["detail"])
        assert "does not decode" in str(ledger["detail"])
        assert "passed over" in second.log()
        assert "a newer checkpoint could not be used" in str(ledger["detail"])
        after = await checkpoint_through(url, 100, source=source_of(second))
        await eventually(
            lambda: "could not be used" not in str(second.dependency("ledger")["detail"]),
            timeout_s=10,
            what="the fallback cleared by a checkpoint of its own",
            worker=second,
        )
    finally:
        for worker in workers:
            worker.stop()
        await bus.close()
    assert good.fills_applied == 60
    assert after.fills_applied == 100


@pytest.mark.invariants_exempt(
    "exposure",
    "orders",
    "duplicates",
    reason="the test plays the venue and stores one fill id twice with different content",
)
async def test_fill_the_ledger_cannot_apply_stops_the_portfolio_loudly_until_a_person_acts(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await connect(url)
    fills = [venue_fill(i) for i in range(1, 11)]
    conflicting = venue_fill(3, quantity="0.5")  # fill id venue-3 again, saying otherwise
    worker = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    workers = [worker]
    try:
        await publish(bus, fills[:5])
        await publish_raw(
            url, subjects.fill_subject(conflicting.symbol), conflicting.encode(), msg_id="again"
        )  # FILLS sequence 6
        await publish(bus, fills[5:])
        await eventually(
            lambda: worker.dependency("ledger")["status"] == "CRITICAL",
            timeout_s=15,
            what="ledger CRITICAL",
            worker=worker,
        )
        detail = str(worker.dependency("ledger")["detail"])
        assert "FILLS sequence 6" in detail
        assert "venue-3" in detail
        assert "other content" in detail
        assert worker.metric("qtrader_portfolio_ledger_stuck") == 1
        assert worker.metric("qtrader_portfolio_fills_refused_total") == 1
        await asyncio.sleep(1.0)  # and it stays stopped: the later fills are not applied
        snapshot = await last_snapshot(url)
        assert snapshot is not None
        assert snapshot.fills_applied == 5
        assert snapshot.fills_through == 5
        assert worker.dependency("ledger")["status"] == "CRITICAL"
        alerts = await read_all(
            url,
            stream=subjects.RISK.name,
            subject=subjects.risk_alert_subject(RiskAlertKind.LEDGER.value),
            message_type=RiskAlert,
        )
        assert len(alerts) == 1
        assert "venue-3" in alerts[0].detail
        worker.stop()

        # A restart alone stops at the same fill; a person's --skip-fill 6 passes over it.
        again = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
        workers.append(again)
        await eventually(
            lambda: "FILLS sequence 6" in str(again.dependency("ledger")["detail"]),
            timeout_s=15,
            what="stopped at the same fill after a restart",
            worker=again,
        )
        again.stop()
        decided = start_worker(
            "portfolio", nats_url=url, log_dir=tmp_path, args=("--skip-fill", "6")
        )
        workers.append(decided)

        def caught_up() -> bool:
            return decided.metric("qtrader_portfolio_fills_skipped_total") == 1

        await eventually(caught_up, timeout_s=15, what="the fill passed over", worker=decided)
        await eventually(
            lambda: decided.dependency("ledger")["status"] != "CRITICAL",
            timeout_s=5,
            what="not CRITICAL",
            worker=decided,
        )
        final: PortfolioSnapshot | None = None
        deadline = asyncio.get_running_loop().time() + 15
        while final is None or final.fills_applied < len(fills):
            assert asyncio.get_running_loop().time() < deadline, "fills not applied"
            await asyncio.sleep(0.2)
            final = await last_snapshot(url)
        assert final.fills_through == len(fills) + 1
    finally:
        for worker in workers:
            worker.stop()
        await bus.close()


@pytest.mark.invariants_exempt(
    "exposure",
    "orders",
    "duplicates",
    reason="the test plays the venue and stores one account entry id twice with other amounts",
)
async def test_entry_the_ledger_cannot_apply_stops_the_portfolio_as_a_fill_does(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await connect(url)
    fills = [venue_fill(i) for i in range(1, 7)]
    funding = venue_entry(0)
    conflicting = funding.model_copy(update={"amount": Decimal("-99")})  # the same id, otherwise
    worker = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    workers = [worker]
    try:
        await publish(bus, [*fills[:3], funding])
        await publish_raw(url, subjects.ACCOUNT_ENTRY, conflicting.encode(), msg_id="again")
        await publish(bus, fills[3:])  # FILLS sequence 5 was the conflicting entry
        await eventually(
            lambda: worker.dependency("ledger")["status"] == "CRITICAL",
            timeout_s=15,
            what="ledger CRITICAL",
            worker=worker,
        )
        detail = str(worker.dependency("ledger")["detail"])
        assert f"FILLS sequence 5: account entry {funding.entry_id}" in detail
        assert "other content" in detail
        assert worker.metric("qtrader_portfolio_entries_refused_total") == 1
        assert worker.metric("qtrader_portfolio_ledger_stuck") == 1
        await asyncio.sleep(1.0)  # and nothing later is applied
        snapshot = await last_snapshot(url)
        assert snapshot is not None
        assert (snapshot.fills_applied, snapshot.entries_applied) == (3, 1)
        assert snapshot.funding == funding.amount
        alerts = await read_all(
            url,
            stream=subjects.RISK.name,
            subject=subjects.risk_alert_subject(RiskAlertKind.LEDGER.value),
            message_type=RiskAlert,
        )
        assert [funding.entry_id in a.detail for a in alerts] == [True]
        worker.stop()

        decided = start_worker(
            "portfolio", nats_url=url, log_dir=tmp_path, args=("--skip-fill", "5")
        )
        workers.append(decided)
        final = await _applied_all(url, len(fills))
        assert (final.entries_applied, final.funding) == (1, funding.amount)
        assert decided.metric("qtrader_portfolio_fills_skipped_total") == 1
    finally:
        for one in workers:
            one.stop()
        await bus.close()


async def _applied_all(url: str, fills: int) -> PortfolioSnapshot:
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        snapshot = await last_snapshot(url)
        if snapshot is not None and snapshot.fills_applied >= fills:
            return snapshot
        assert asyncio.get_running_loop().time() < deadline, "fills not applied"
        await asyncio.sleep(0.2)
