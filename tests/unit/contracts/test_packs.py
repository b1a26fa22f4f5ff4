"""Packs: a step's candles in one wire message, each item held to the rules of a message alone.

A pack is how market data sends a step of every symbol as one message; a reader must get the very
candles sent alone, refuse a bad item on its own (and only it), and refuse whole a pack that is
not one of its kind. Fuzzed like every decoder: whatever the bytes, ``decode_all`` returns valid
messages or raises ``MessageRejected``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtrader.contracts.messages import (
    MAX_PACK_ITEMS,
    Candle,
    CandleSource,
    MessageRejected,
    OrderIntent,
    Pack,
    RejectReason,
    Signal,
    decode,
    decode_all,
)
from support.messages import sample_messages

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def _candle(symbol: str, close: str = "100.5", open_time_ms: int = 1_700_000_000_000) -> Candle:
    return Candle(
        symbol=symbol,
        interval="1m",
        open_time_ms=open_time_ms,
        close_time_ms=open_time_ms + 59_999,
        open=close,
        high=close,
        low=close,
        close=close,
        volume="3",
        source=CandleSource.SYNTHETIC,
    )


def _step() -> tuple[Candle, ...]:
    return tuple(_candle(symbol) for symbol in SYMBOLS)


def _document(pack: Pack[Candle]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(pack.encode())
    return document


def test_a_pack_carries_its_candles_exactly_in_order() -> None:
    step = _step()
    decoded = decode_all(Pack(step).encode(), Candle)
    assert decoded.messages == list(step)
    assert decoded.refused == []


def test_a_message_alone_decodes_as_before() -> None:
    candle = _candle("BTCUSDT")
    decoded = decode_all(candle.encode(), Candle)
    assert decoded.messages == [candle]


def test_a_bad_item_is_refused_alone_and_the_others_are_delivered() -> None:
    document = _document(Pack(_step()))
    document["items"][1]["close"] = "NaN"
    document["items"][2]["kind"] = "signal"
    decoded = decode_all(json.dumps(document).encode(), Candle)
    assert [c.symbol for c in decoded.messages] == ["BTCUSDT"]
    assert [r.reason for r in decoded.refused] == [
        RejectReason.INVALID_FIELDS,
        RejectReason.WRONG_KIND,
    ]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"of": "signal"}, RejectReason.WRONG_KIND),
        ({"schema_version": 2}, RejectReason.UNKNOWN_VERSION),
        ({"schema_version": True}, RejectReason.UNKNOWN_VERSION),
        ({"items": []}, RejectReason.INVALID_FIELDS),
        ({"items": {"0": {}}}, RejectReason.INVALID_FIELDS),
        ({"items": [{}] * (MAX_PACK_ITEMS + 1)}, RejectReason.INVALID_FIELDS),
        ({"extra": 1}, RejectReason.INVALID_FIELDS),
    ],
)
def test_a_pack_that_is_not_one_of_candles_is_refused_whole(
    change: dict[str, Any], reason: RejectReason
) -> None:
    document = _document(Pack(_step())) | change
    with pytest.raises(MessageRejected) as refused:
        decode_all(json.dumps(document).encode(), Candle)
    assert refused.value.reason is reason


def test_a_kind_that_is_not_packable_refuses_every_pack() -> None:
    """Orders and fills travel one by one: each its own Nats-Msg-Id, which the stream
    deduplicates on. A pack of them on their subjects is poison."""
    intent = next(m for m in sample_messages() if isinstance(m, OrderIntent))
    document = {
        "kind": "pack",
        "schema_version": 1,
        "of": "order_intent",
        "items": [json.loads(intent.encode())],
    }
    with pytest.raises(MessageRejected) as refused:
        decode_all(json.dumps(document).encode(), OrderIntent)
    assert refused.value.reason is RejectReason.WRONG_KIND
    with pytest.raises(MessageRejected):
        decode(Pack(_step()).encode(), Candle)  # a reader of lone messages takes no pack


def test_the_same_candles_make_the_same_pack_id_and_other_candles_another() -> None:
    step = _step()
    assert Pack(step).dedup_id == Pack(tuple(_step())).dedup_id
    assert Pack(step).dedup_id != Pack(step[:2]).dedup_id
    assert Pack(step).dedup_id != Pack(step[::-1]).dedup_id
    moved = (*step[:2], _candle("SOLUSDT", open_time_ms=1_700_000_060_000))
    assert Pack(step).dedup_id != Pack(moved).dedup_id


def test_a_pack_is_made_of_one_packable_kind_and_at_most_max_items() -> None:
    intent = next(m for m in sample_messages() if isinstance(m, OrderIntent))
    with pytest.raises(ValueError, match="one packable kind"):
        Pack((intent,))  # type: ignore[type-var]  # what the type checker refuses too
    signal = next(m for m in sample_messages() if isinstance(m, Signal))
    with pytest.raises(ValueError, match="one packable kind"):
        Pack((_candle("BTCUSDT"), signal))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to"):
        Pack(())
    with pytest.raises(ValueError, match="1 to"):
        Pack(tuple(_candle("BTCUSDT", open_time_ms=i * 60_000) for i in range(MAX_PACK_ITEMS + 1)))


BUDGET = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
HOSTILE = st.one_of(
    st.sampled_from(["1e999", "NaN", "", "\udcff", "9" * 5000, "pack", "candle"]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.just([[[[[]]]]]),
    st.just({"kind": "pack"}),
)


def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for key, child in value.items() for p in _leaf_paths(child, (*path, key))]
    if isinstance(value, list):
        return [p for i, child in enumerate(value) for p in _leaf_paths(child, (*path, i))]
    return [path]


def _assert_decodes_or_rejects(data: bytes) -> None:
    try:
        decoded = decode_all(data, Candle)
    except MessageRejected:
        return
    for candle in decoded.messages:
        assert isinstance(candle, Candle)
        assert decode(candle.encode(), Candle) == candle  # every item passed is fully valid


@BUDGET
@given(choice=st.data(), leaf=HOSTILE)
def test_decode_all_of_a_mutated_pack_never_raises_anything_else(
    choice: st.DataObject, leaf: object
) -> None:
    document = _document(Pack(_step()))
    path = choice.draw(st.sampled_from(_leaf_paths(document)))
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = leaf
    _assert_decodes_or_rejects(
        json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
    )


@BUDGET
@given(cut=st.integers(min_value=0, max_value=2000), noise=st.binary(min_size=1, max_size=8))
def test_decode_all_of_a_corrupted_pack_never_raises_anything_else(cut: int, noise: bytes) -> None:
    data = Pack(_step()).encode()
    at = cut % (len(data) + 1)
    _assert_decodes_or_rejects(data[:at] + noise + data[at:])
