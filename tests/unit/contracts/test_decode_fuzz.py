"""Fuzzing every message type's decoder: whatever the bytes, ``decode`` returns a valid message
of the type asked for or raises ``MessageRejected``; nothing else, ever.

Three sources of input per type: random bytes, random JSON documents, and valid messages with
one leaf replaced by a hostile value. The budget is bounded (``max_examples`` per type, no
deadline) so the whole module runs in a few seconds on a shared machine.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtrader.contracts.messages import Message, MessageRejected, decode
from support.messages import sample_messages

SAMPLES = {type(message): message for message in sample_messages()}
TYPES = sorted(SAMPLES, key=lambda t: t.KIND)
BUDGET = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

HOSTILE_LEAVES = st.one_of(
    st.sampled_from(
        ["1e999", "-1e999", "NaN", "Infinity", "-0", "1e-999", "", "\udcff", "9" * 5000]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
    st.just([[[[[]]]]]),
    st.just({"kind": "candle"}),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def _assert_decodes_or_rejects(data: bytes, message_type: type[Message]) -> None:
    try:
        message = decode(data, message_type)
    except MessageRejected:
        return
    assert isinstance(message, message_type)
    assert decode(message.encode(), message_type) == message  # what passed is fully valid


def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for key, child in value.items() for p in _leaf_paths(child, (*path, key))]
    if isinstance(value, list):
        return [p for i, child in enumerate(value) for p in _leaf_paths(child, (*path, i))]
    return [path]


def _encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("message_type", TYPES, ids=[t.KIND for t in TYPES])
@BUDGET
@given(data=st.binary(max_size=512))
def test_decode_of_random_bytes_never_raises_anything_else(
    message_type: type[Message], data: bytes
) -> None:
    _assert_decodes_or_rejects(data, message_type)


@pytest.mark.parametrize("message_type", TYPES, ids=[t.KIND for t in TYPES])
@BUDGET
@given(document=JSON_VALUES, keep_envelope=st.booleans())
def test_decode_of_random_json_never_raises_anything_else(
    message_type: type[Message], document: Any, keep_envelope: bool
) -> None:
    if keep_envelope and isinstance(document, dict):  # get past the kind and version checks
        document = {**document, "kind": message_type.KIND, "schema_version": 1}
    _assert_decodes_or_rejects(_encode(document), message_type)


@pytest.mark.parametrize("message_type", TYPES, ids=[t.KIND for t in TYPES])
@BUDGET
@given(choice=st.data(), leaf=HOSTILE_LEAVES)
def test_decode_of_a_mutated_valid_message_never_raises_anything_else(
    message_type: type[Message], choice: st.DataObject, leaf: object
) -> None:
    document = json.loads(SAMPLES[message_type].encode())
    path = choice.draw(st.sampled_from(_leaf_paths(document)))
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = leaf
    _assert_decodes_or_rejects(_encode(document), message_type)


@pytest.mark.parametrize("message_type", TYPES, ids=[t.KIND for t in TYPES])
@BUDGET
@given(cut=st.integers(min_value=0, max_value=2000), noise=st.binary(min_size=1, max_size=8))
def test_decode_of_a_corrupted_valid_message_never_raises_anything_else(
    message_type: type[Message], cut: int, noise: bytes
) -> None:
    data = SAMPLES[message_type].encode()
    at = cut % (len(data) + 1)
    _assert_decodes_or_rejects(data[:at] + noise + data[at:], message_type)
