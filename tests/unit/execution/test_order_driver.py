"""The order driver with the exposure book and the paper venue: what reaches the venue, when.

Real parts only: the paper exchange behind ``PaperVenue``, a ``HaltGate``, an ``ExposureBook``
fed by what the driver publishes, as the worker wires them.
"""

from __future__ import annotations

import time
from decimal import Decimal

from prometheus_client import REGISTRY

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

INFO = paper_exchange_info()
PRICE = Decimal(30_000)
TTL_MS = 5_000


def _halted_lookups() -> float:
    return REGISTRY.get_sample_value("qtrader_halted_lookups_total") or 0.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class Rig:
    """The worker's wiring of a driver, minus the bus: updates and fills go to the book."""

    def __init__(self, state: TradingState, *, max_position_usd: Decimal = Decimal(1000)) -> None:
        self.book = ExposureBook()
        self.updates: list[OrderUpdate] = []
        self.looked_up: list[str] = []
        self.gate = HaltGate(heartbeat_timeout_s=3600)
        self.gate.apply(HaltLatch(state=state, revision=1, issued_at_ms=_now_ms()))
        self.gate.heartbeat()
        paper = PaperExchange(
            exchange=INFO, fee_bps=Decimal(0), slippage_bps=Decimal(0), positions=self.book.position
        )
        paper.on_candle(flat_candle("BTCUSDT", PRICE, open_time_ms=1_700_000_000_000))
        self.limits = SendLimits(
            max_position_usd=max_position_usd,
            max_open_positions=3,
            max_leverage=Decimal(3),
            equity=Decimal(10_000),
            marks={"BTCUSDT": PRICE},
            instrument=INFO.instrument("BTCUSDT"),
        )
        self.driver = OrderDriver(
            PaperVenue(paper, INFO, history=self._history),
            self.gate,
            marks={"BTCUSDT": PRICE}.get,
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

    def _history(self, client_order_id: str) -> tuple[Fill, ...]:
        self.looked_up.append(client_order_id)  # a look-up the paper exchange cannot answer
        return self.book.fills_of(client_order_id)

    def _admit(self, order: OrderIntent) -> Admitted | Refused:
        return admit_order(self.book, order, limits=self.limits, now_ms=_now_ms(), ttl_ms=TTL_MS)

    async def _update(self, update: OrderUpdate) -> None:
        self.updates.append(update)
        self.book.apply_update(update)

    async def _fill(self, fill: Fill) -> None:
        self.book.apply_fill(fill)

    async def execute(self, intent: OrderIntent) -> OrderUpdate:
        final = await self.redeliver(intent)
        assert final is not None, "an intent not ended before ends now"
        return final

    async def redeliver(self, intent: OrderIntent) -> OrderUpdate | None:
        return await self.driver.execute(intent, max_slippage_bps=100)


def _intent(name: str, quantity: str = "0.030", *, age_ms: int = 0) -> OrderIntent:
    intent_id = f"sig-{name}"
    return OrderIntent(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal(quantity),
        reference_price=PRICE,
        policy_revision=1,
        created_at_ms=_now_ms() - age_ms,
    )


async def test_a_filled_intent_is_counted_once_the_moment_it_fills() -> None:
    rig = Rig(TradingState.ACTIVE)
    intent = _intent("a")
    rig.book.reserve(
        intent_id=intent.intent_id,
        client_order_id=intent.client_order_id,
        symbol="BTCUSDT",
        signed_quantity=intent.quantity,
        created_at_ms=intent.created_at_ms,
        local=True,
    )
    final = await rig.execute(intent)
    assert final.status is OrderStatus.FILLED
    assert rig.book.position("BTCUSDT") == Decimal("0.030")
    assert rig.book.projected() == {"BTCUSDT": Decimal("0.030")}
    assert rig.book.backlog().size == 0


async def test_an_order_beyond_the_limit_is_cut_and_the_rest_refused_with_the_reason() -> None:
    rig = Rig(TradingState.ACTIVE)
    assert (await rig.execute(_intent("a", "0.020"))).status is OrderStatus.FILLED
    # 0.040 would be 1,212 at the 30,300 limit: 0.013 fits (1000 / 30300 = 0.0330).
    final = await rig.execute(_intent("b", "0.020"))
    assert final.status is OrderStatus.CANCELED  # 0.013 filled, the rest refused
    assert final.filled_quantity == Decimal("0.013")
    assert final.refused_by is RefusedBy.EXPOSURE_BOOK
    assert final.reason is not None
    assert final.reason.startswith("max_position_usd")
    assert rig.book.position("BTCUSDT") == Decimal("0.033")
    assert rig.book.in_flight("BTCUSDT") == 0


async def test_an_order_with_too_little_room_left_is_rejected_unsent() -> None:
    rig = Rig(TradingState.ACTIVE)
    assert (await rig.execute(_intent("a", "0.030"))).status is OrderStatus.FILLED
    final = await rig.execute(_intent("b", "0.010"))  # 0.003 fits, below the minimum notional
    assert final.status is OrderStatus.REJECTED
    assert final.refused_by is RefusedBy.EXPOSURE_BOOK
    assert [u.status for u in rig.updates[-1:]] == [OrderStatus.REJECTED]
    assert rig.book.position("BTCUSDT") == Decimal("0.030")


async def test_an_intent_redelivered_after_its_final_update_is_not_driven_again() -> None:
    """Its acknowledgement lost (the broker hung as it went), an intent comes again after the
    consumer's ack wait, past its time to live. Driven again, it got a second final update
    (REJECTED, then EXPIRED: CI's broker-hang scenario), and a filled one would be looked up
    and reported again."""
    rig = Rig(TradingState.ACTIVE)
    filled = _intent("a", "0.030")
    assert (await rig.execute(filled)).status is OrderStatus.FILLED
    refused = _intent("b", "0.010")
    assert (await rig.execute(refused)).status is OrderStatus.REJECTED
    updates = len(rig.updates)
    for intent in (filled, refused):
        late = intent.model_copy(update={"created_at_ms": intent.created_at_ms - 30_000})
        assert await rig.redeliver(late) is None
    assert len(rig.updates) == updates, "nothing published again"
    assert rig.looked_up == [], "nothing asked of the venue"
    assert rig.book.position("BTCUSDT") == Decimal("0.030")


async def test_an_intent_past_its_ttl_ends_expired_with_its_age_and_nothing_is_asked() -> None:
    rig = Rig(TradingState.ACTIVE)
    final = await rig.execute(_intent("old", age_ms=TTL_MS + 2_000))
    assert final.status is OrderStatus.EXPIRED
    assert final.refused_by is RefusedBy.EXPOSURE_BOOK
    assert final.reason is not None
    assert "ms old, ttl 5000 ms" in final.reason
    assert rig.looked_up == []
    assert [u.status for u in rig.updates] == [OrderStatus.EXPIRED]  # no PENDING_NEW


async def test_while_halted_a_queued_intent_never_sent_is_ended_without_a_look_up() -> None:
    rig = Rig(TradingState.HALTED)
    before = _halted_lookups()
    final = await rig.execute(_intent("queued", age_ms=4_000))  # redelivered, maybe sent
    assert final.status is OrderStatus.REJECTED
    assert final.refused_by is RefusedBy.HALT_GATE
    assert rig.looked_up == []
    assert _halted_lookups() == before


async def test_while_halted_an_intent_sent_before_is_looked_up_and_counted() -> None:
    rig = Rig(TradingState.HALTED)
    intent = _intent("sent", age_ms=4_000)
    rig.book.apply_update(  # another worker recorded an attempt of it, then crashed
        OrderUpdate(
            client_order_id=intent.client_order_id,
            intent_id=intent.intent_id,
            symbol="BTCUSDT",
            side=Side.BUY,
            status=OrderStatus.PENDING_NEW,
            quantity=intent.quantity,
            filled_quantity=Decimal(0),
            avg_price=Decimal(0),
            exchange="paper",
            worker_id="crashed",
            ts_ms=intent.created_at_ms,
        )
    )
    before = _halted_lookups()
    final = await rig.execute(intent)
    assert final.status is OrderStatus.REJECTED  # nothing found, nothing sent: halted
    assert rig.looked_up
    assert _halted_lookups() - before == len(rig.looked_up)
