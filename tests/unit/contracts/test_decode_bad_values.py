"""``decode`` turns any bytes into a message or a ``MessageRejected``, and ``Undecodable``
carries a refused stored value to the reader that must decide what it means."""

from __future__ import annotations

import json

import pytest

from qtrader.contracts.messages import (
    MAX_MESSAGE_BYTES,
    HaltLatch,
    MessageRejected,
    PolicyRevision,
    RejectReason,
    Undecodable,
    decode,
)

VALID_LATCH = {
    "kind": "halt_latch",
    "schema_version": 1,
    "state": "ACTIVE",
    "revision": 3,
    "issued_at_ms": 1,
}

BAD_VALUES: dict[str, tuple[bytes, RejectReason]] = {
    "not JSON": (b"HALTED please", RejectReason.MALFORMED),
    "array nested 10,000 deep": (b"[" * 10_000 + b"]" * 10_000, RejectReason.MALFORMED),
    "object nested 10,000 deep": (
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        RejectReason.MALFORMED,
    ),
    "wrong kind": (json.dumps({**VALID_LATCH, "kind": "candle"}).encode(), RejectReason.WRONG_KIND),
    "unknown schema version": (
        json.dumps({**VALID_LATCH, "schema_version": 99}).encode(),
        RejectReason.UNKNOWN_VERSION,
    ),
    "not UTF-8": (b'{"kind": "halt_latch", "state": "\xff\xfe"}', RejectReason.MALFORMED),
    "1 MB": (b'{"reason": "' + b"x" * 1_000_000 + b'"}', RejectReason.TOO_LARGE),
    "integer of 5,000 digits": (b'{"revision": ' + b"9" * 5_000 + b"}", RejectReason.MALFORMED),
    "NaN": (b'{"revision": NaN}', RejectReason.MALFORMED),
    "1e999": (json.dumps({**VALID_LATCH, "revision": 1e999}).encode(), RejectReason.MALFORMED),
    "a JSON array": (b"[1, 2]", RejectReason.MALFORMED),
    "empty": (b"", RejectReason.MALFORMED),
    "a byte order mark first": (
        "\ufeff".encode() + json.dumps(VALID_LATCH).encode(),
        RejectReason.MALFORMED,
    ),
    "Infinity": (b'{"revision": -Infinity}', RejectReason.MALFORMED),
    "state not a state": (
        json.dumps({**VALID_LATCH, "state": "MAYBE"}).encode(),
        RejectReason.INVALID_FIELDS,
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_decode_when_value_is_bad_then_rejects_with_reason(name: str) -> None:
    data, reason = BAD_VALUES[name]
    with pytest.raises(MessageRejected) as rejected:
        decode(data, HaltLatch)
    assert rejected.value.reason is reason
    assert len(rejected.value.detail) <= MessageRejected.MAX_DETAIL_CHARS


def test_decode_when_nested_deep_inside_a_valid_envelope_then_rejects() -> None:
    nested = "[" * 5_000 + "]" * 5_000
    data = b'{"kind": "policy_revision", "schema_version": 1, "spec": ' + nested.encode() + b"}"
    with pytest.raises(MessageRejected):
        decode(data, PolicyRevision)


def test_decode_when_just_under_the_size_limit_then_parses() -> None:
    padding = " " * (MAX_MESSAGE_BYTES - 200)
    latch = decode(json.dumps(VALID_LATCH).encode() + padding.encode(), HaltLatch)
    assert latch.revision == 3


def test_undecodable_when_made_from_a_rejection_then_says_where_and_why() -> None:
    with pytest.raises(MessageRejected) as rejected:
        decode(b"not json", HaltLatch)
    bad = Undecodable.of(rejected.value, source="qtrader-halt/latch", stored_revision=7)
    assert bad.reason is RejectReason.MALFORMED
    assert str(bad).startswith("revision 7 of qtrader-halt/latch does not decode: malformed: ")
    assert bad.why.startswith("malformed: not JSON")
    assert not hasattr(bad, "revision")  # never mistaken for a message's own revision


def test_undecodable_when_turned_into_an_error_then_keeps_reason_and_place() -> None:
    bad = Undecodable(
        source="qtrader-ess/main",
        stored_revision=4,
        reason=RejectReason.WRONG_KIND,
        detail="expected kind 'ess_record', got 'x'",
    )
    error = bad.rejected()
    assert error.reason is RejectReason.WRONG_KIND
    assert "qtrader-ess/main revision 4" in str(error)
