"""``stream_position`` reads a delivered message's stream sequence and pending count off its ack
subject; nats-py's own parser (``Msg.metadata``) is the reference, for every form of subject."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from qtrader.bus.nats_bus import stream_position

_NAME = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_-0123456789", min_size=1, max_size=12)
_NUMBER = st.integers(min_value=0, max_value=2**63 - 1)


def _message(reply: str) -> Msg:
    return Msg(_client=None, subject="market.candle.BTCUSDT", reply=reply)  # type: ignore[arg-type]


@given(_NAME, _NAME, _NUMBER, _NUMBER, _NUMBER, _NUMBER, _NUMBER)
def test_a_subject_without_a_domain_reads_as_nats_py_reads_it(
    stream: str, consumer: str, delivered: int, sseq: int, cseq: int, ts: int, pending: int
) -> None:
    reply = f"$JS.ACK.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ts}.{pending}"
    metadata = _message(reply).metadata
    position = stream_position(_message(reply))
    assert position == (metadata.sequence.stream, metadata.num_pending) == (sseq, pending)


@given(_NAME, _NAME, _NAME, _NUMBER, _NUMBER, _NUMBER, _NUMBER, _NUMBER, _NAME)
def test_a_subject_with_a_domain_and_account_reads_as_nats_py_reads_it(
    domain: str,
    stream: str,
    consumer: str,
    delivered: int,
    sseq: int,
    cseq: int,
    ts: int,
    pending: int,
    token: str,
) -> None:
    reply = (
        f"$JS.ACK.{domain}.ACCOUNT.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ts}.{pending}"
        f".{token}"
    )
    metadata = _message(reply).metadata
    assert stream_position(_message(reply)) == (metadata.sequence.stream, metadata.num_pending)
    assert stream_position(_message(reply)) == (sseq, pending)


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.def", "$JS.ACK.only.four"])
def test_a_subject_that_is_no_ack_subject_is_refused_as_nats_py_refuses_it(reply: str) -> None:
    with pytest.raises(NotJSMessageError):
        stream_position(_message(reply))
