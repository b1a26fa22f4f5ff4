"""The exposure invariant on the paper exchange's fills as the driver and the book make them.

What the broker-fault stress runs showed (a position 1.0085x ``maxPositionUsd`` at broker-hang
scale 0.1), rebuilt with real parts: the order driver, the exposure book, the paper exchange
behind ``PaperVenue``, wired as the execution worker wires them, minus the bus. Across a broker
stall the candles held back arrive as a burst, so the price moves several steps between two
sends: a long taken up to the limit is worth more a moment later, and the reduce-only SELL that
follows fills at the higher price. That trade makes the position smaller; only the market made
it worth more. The checker must not take the market's move for our sending, and must still
judge every trade that adds to a position at that trade's price.
"""

from __future__ import annotations

import time
from decimal import Decimal

from qtrader.contracts.messages import (
    Fill,
    HaltLatch,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    RefusedBy,
    Side,
    TradingState,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.execution.decisions import client_order_id_for
from qtrader.execution.exposure import (
    Admitted,
    ExposureBook,
    Refused,
    SendLimits,
    admit_order,
    intent_expired,
)
from qtrader.execution.halt import HaltGate
from qtrader.execution.orders import OrderDriver
from qtrader.execution.paper import PaperExchange, PaperVenue
from qtrader.instruments import paper_exchange_info
from qtrader_tools.candles import flat_candle
from qtrader_tools.stress.harness import policy_document
from qtrader_tools.stress.invariants import check_exposure, from_paper_fills, paper_limits

INFO = paper_exchange_info()
SYMBOL = "ETHUSDT"
TTL_MS = 5_000
MAX_SLIPPAGE_BPS = 20  # the policy's default
SPEC: TradingPolicySpec = policy_document(
    "exposure-market-move",
    symbols=[SYMBOL],
    risk={"maxPositionUsd": "1000", "maxOpenPositions": 2},
).spec


def _now_ms() -> int:
    return int(time.time() * 1000)


class PaperWorker:
    """The execution worker's sending path on the paper exchange (as in broker-outage: fees
    4 bps, slippage 2 bps): prices reach the marks and the exchange together, as ``_on_candle``
    does, and fills go to the book before anything else sees them."""

    def __init__(self) -> None:
        self.book = ExposureBook()
        self.fills: list[Fill] = []
        self.marks: dict[str, Decimal] = {}
        self._minute = 0
        gate = HaltGate(heartbeat_timeout_s=3600)
        gate.apply(HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=_now_ms()))
        gate.heartbeat()
        self.paper = PaperExchange(
            exchange=INFO,
            fee_bps=Decimal(4),
            slippage_bps=Decimal(2),
            positions=self.book.position,
        )
        self.driver = OrderDriver(
            PaperVenue(self.paper, INFO, history=self.book.fills_of),
            gate,
            marks=self.marks.get,
            publish_update=self._update,
            publish_fill=self._fill,
            admit=self._admit,
            expiry=lambda i: intent_expired(
                created_at_ms=i.created_at_ms, now_ms=_now_ms(), ttl_ms=TTL_MS
            ),
            deadline=lambda i: i.created_at_ms + TTL_MS,
            was_sent=self.book.was_sent,
            ended=self.book.ended,
            worker_id="me",
        )

    def price(self, close: str) -> None:
        """The next candle's close (the worker's ``_on_candle``)."""
        self._minute += 1
        price = Decimal(close)
        candle = flat_candle(SYMBOL, price, open_time_ms=1_700_000_000_000 + 60_000 * self._minute)
        self.marks[SYMBOL] = price
        self.paper.on_candle(candle)

    async def send(
        self, name: str, side: Side, quantity: str, reference: str, *, reduce_only: bool = False
    ) -> OrderUpdate:
        intent_id = f"sig-{name}"
        intent = OrderIntent(
            intent_id=intent_id,
            client_order_id=client_order_id_for(intent_id),
            symbol=SYMBOL,
            side=side,
            quantity=Decimal(quantity),
            reference_price=Decimal(reference),
            reduce_only=reduce_only,
            policy_revision=1,
            created_at_ms=_now_ms(),
        )
        final = await self.driver.execute(intent, max_slippage_bps=MAX_SLIPPAGE_BPS)
        assert final is not None, "each intent is driven once here"
        return final

    def _admit(self, order: OrderIntent) -> Admitted | Refused:
        limits = SendLimits(
            max_position_usd=SPEC.risk.max_position_usd,
            max_open_positions=SPEC.risk.max_open_positions,
            max_leverage=SPEC.risk.max_leverage,
            equity=Decimal(10_000),
            marks=dict(self.marks),
            instrument=INFO.instrument(order.symbol),
        )
        return admit_order(self.book, order, limits=limits, now_ms=_now_ms(), ttl_ms=TTL_MS)

    async def _update(self, update: OrderUpdate) -> None:
        self.book.apply_update(update)

    async def _fill(self, fill: Fill) -> None:
        self.book.apply_fill(fill)
        self.fills.append(fill)


async def test_a_reduction_after_the_market_rose_is_no_breach_and_adding_then_is_refused() -> None:
    worker = PaperWorker()
    worker.price("42.09")
    # Decided before the stall at 42.09; admitted at its 42.17418 cap: cut to the limit.
    bought = await worker.send("buy", Side.BUY, "24", "42.09")
    assert bought.status is OrderStatus.CANCELED
    assert bought.filled_quantity == Decimal("23.711")  # 998.23 at the 42.10 fill
    worker.price("43.04")  # the burst after the stall: +2.3% between two sends
    reduced = await worker.send("reduce", Side.SELL, "0.273", "42.58", reduce_only=True)
    assert reduced.status is OrderStatus.FILLED
    # Adding now is valued with the whole position at the current price: refused.
    added = await worker.send("add", Side.BUY, "0.1", "43.04")
    assert added.status is OrderStatus.REJECTED
    assert added.refused_by is RefusedBy.EXPOSURE_BOOK

    report = check_exposure(trades=from_paper_fills(worker.fills), limits=paper_limits(SPEC))
    assert [(f.side, f.price) for f in worker.fills] == [
        (Side.BUY, Decimal("42.10")),
        (Side.SELL, Decimal("43.03")),
    ]
    assert report.ok, report.summary()
    assert report.max_position_ratio == Decimal("0.9982331")  # 23.711 x 42.10 / 1000
    # What the market made of it, reported but not the sending's doing: 23.438 x 43.03.
    assert report.max_held_ratio == Decimal("1.00853714")
