"""The portfolio compares its ledger's USDT wallet and unrealized PnL with the venue's at settled
reads (testnet mode, the local Binance-compatible server, real execution and portfolio processes
on a real nats-server).

While execution trades, the venue charges funding, books transfers (USDT and BNB) and takes part
of the commissions in BNB, execution reads the account every second: every settled read agrees
(a BNB commission is not paid from the USDT wallet, a transfer is booked from the income
history before the read it is in is compared). Then money moves on the venue whose income row
shows late: not an alert, the row explains it once it shows. Then money moves that no income
row ever shows: exactly one ``wallet_reconciliation`` alert, the gauge and ``/health`` say so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import RiskAlert, RiskAlertKind, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.flow import flowing
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
CAPITAL = "10000"
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "wallet-test"},
        "spec": {
            "mode": "testnet",
            "symbols": [SYMBOL],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxSlippageBps": 100},
            "paper": {"initialCapitalUsd": CAPITAL},
        },
    }
)
GRACE_S = 4.0  # the portfolio's wallet grace
NEVER_MS = 10**12  # an income row shown in 30 years: money no row explains
COMPARED = "qtrader_wallet_reconciliations_total"
READS = "qtrader_venue_account_reads_total"
TRADE_EVERY_S = 0.3  # a signal, and so an order, this often while trading


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


@pytest.fixture
async def stack(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> AsyncIterator[Stack]:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    portfolio = start_worker(
        "portfolio", nats_url=url, log_dir=tmp_path, args=("--wallet-grace", str(GRACE_S))
    )
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = (
        *("--worker-id", "exec-wallet", "--exchange-url", exchange.base_url),
        *("--reconcile-interval", "1", "--income-interval", "2"),
    )
    execution = start_worker("execution", nats_url=url, log_dir=tmp_path, args=args, env=env)
    try:
        yield Stack(url=url, bus=bus, portfolio=portfolio, execution=execution)
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline([portfolio, execution], nats_url=url)
        await bus.close()


class Stack:
    def __init__(self, *, url: str, bus: Bus, portfolio: Worker, execution: Worker) -> None:
        self.url, self.bus, self.portfolio, self.execution = url, bus, portfolio, execution

    def compared(self, outcome: str) -> float:
        return self.portfolio.metric(COMPARED, outcome=outcome)

    async def agreeing_reads(self, more: int, what: str) -> None:
        """Wait until ``more`` settled reads beyond those so far agreed with the ledger."""
        target = self.compared("agrees") + more
        try:
            await eventually(
                lambda: self.compared("agrees") >= target,
                timeout_s=60,
                what=what,
                worker=self.portfolio,
            )
        except AssertionError as exc:
            raise AssertionError(f"{self.outcomes()}\n{exc}") from None

    def outcomes(self) -> str:
        """The reads' fates so far, for a failure to say where they went."""
        reads = {o: self.execution.metric(READS, outcome=o) for o in ("settled", "unsettled")}
        compared = {o: self.compared(o) for o in ("agrees", "differs", "passed")}
        return f"venue account reads {reads}; compared {compared}"

    async def wallet_alerts(self) -> list[RiskAlert]:
        alerts = await read_all(
            self.url,
            stream=subjects.RISK.name,
            subject=subjects.all_of(subjects.RISK_ALERT_PREFIX),
            message_type=RiskAlert,
        )
        return [a for a in alerts if a.alert_kind is RiskAlertKind.WALLET_RECONCILIATION]


def _filled(exchange: SimAdmin) -> int:
    return len([o for o in exchange.orders() if o["status"] == "FILLED"])


async def test_wallet_when_trading_funding_transfers_and_bnb_fees_then_every_settled_read_agrees(
    stack: Stack, exchange: SimAdmin
) -> None:
    exchange.transfer(KEY, "BNB", "1")
    # A read is settled only with nothing in flight from its first read of the account to its
    # second: trading back to back (an order every 50 ms) left no such moment for 60 s in CI.
    async with flowing(stack.bus, every_s=TRADE_EVERY_S):
        await eventually(lambda: _filled(exchange) >= 3, timeout_s=30, what="three fills")
        exchange.fee_burn(KEY, True)  # from here commissions are paid in BNB
        filled = _filled(exchange)
        await eventually(lambda: _filled(exchange) >= filled + 3, timeout_s=30, what="BNB fills")
        exchange.funding_rate(SYMBOL, "0.0001")
        exchange.settle_funding(SYMBOL)
        exchange.transfer(KEY, "USDT", "250")
        await stack.agreeing_reads(2, "settled reads while trading")
        exchange.fee_burn(KEY, False)
        exchange.funding_rate(SYMBOL, "-0.00025")
        exchange.settle_funding(SYMBOL)
        exchange.transfer(KEY, "USDT", "-100.5")
        await stack.agreeing_reads(2, "settled reads while trading, again")
    await stack.agreeing_reads(3, "settled reads once trading stopped")

    bnb_fees = [t for t in exchange.income() if t["incomeType"] == "COMMISSION"]
    assert {t["asset"] for t in bnb_fees} == {"USDT", "BNB"}, "commissions in both assets"
    assert stack.compared("differs") == 0
    assert await stack.wallet_alerts() == []
    assert stack.portfolio.metric("qtrader_wallet_mismatch") == 0
    wallet = stack.portfolio.dependency("wallet")
    assert wallet["status"] == "OK"
    assert "agrees with the venue" in str(wallet["detail"])
    reads = stack.execution.dependency("venue-account")  # the wallet is being compared
    assert reads["status"] == "OK", reads
    assert "settled reads, the last" in str(reads["detail"]), reads
    settled = stack.execution.metric("qtrader_venue_account_reads_total", outcome="settled")
    unsettled = stack.execution.metric("qtrader_venue_account_reads_total", outcome="unsettled")
    print(
        f"\nsettled reads {settled:.0f}, unsettled {unsettled:.0f}, compared and agreeing "
        f"{stack.compared('agrees'):.0f}, passed {stack.compared('passed'):.0f}; {wallet['detail']}"
    )


async def test_wallet_when_money_moves_with_no_income_row_then_exactly_one_alert(
    stack: Stack, exchange: SimAdmin
) -> None:
    await stack.agreeing_reads(2, "settled reads before anything moved")

    # A deposit whose income row shows 2 s late (less than the grace): no alert.
    exchange.transfer(KEY, "USDT", "75", income_delay_ms=2_000)
    await stack.agreeing_reads(int(GRACE_S) + 2, "settled reads once the late row is booked")
    assert await stack.wallet_alerts() == []

    # A withdrawal no income row will ever show: money nothing explains.
    exchange.transfer(KEY, "USDT", "-40", income_delay_ms=NEVER_MS)
    await eventually(
        lambda: stack.portfolio.metric("qtrader_wallet_mismatch") == 1,
        timeout_s=30,
        what="the wallet mismatch",
        worker=stack.portfolio,
    )
    await asyncio.sleep(3)  # more differing reads: still one alert for the episode
    (alert,) = await stack.wallet_alerts()
    assert alert.threshold - alert.value == Decimal(40), alert.detail
    wallet = stack.portfolio.dependency("wallet")
    assert wallet["status"] == "DEGRADED"
    assert str(alert.value) in str(wallet["detail"])
    assert stack.portfolio.health()["status"] == "DEGRADED"
    print(f"\nalert: {alert.detail}")
