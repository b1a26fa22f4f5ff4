"""Reading a /metrics page: one sample by name and exact labels, a family's total, its labels."""

from __future__ import annotations

import pytest

from qtrader_tools.metrics import find, labelled, parse, total, value

PAGE = """\
# HELP qtrader_signals_denied_total Signals denied.
# TYPE qtrader_signals_denied_total counter
qtrader_signals_denied_total{reason="halted"} 7.0
qtrader_signals_denied_total{reason="backlog_full"} 2.0
# HELP qtrader_messages_rejected_total Rejected messages.
# TYPE qtrader_messages_rejected_total counter
qtrader_messages_rejected_total{consumer="exec",reason="not_json"} 3.0
qtrader_messages_rejected_total{consumer="exec",reason="too_deep"} 1.0
# HELP qtrader_intent_backlog Intents decided, not final.
# TYPE qtrader_intent_backlog gauge
qtrader_intent_backlog 4.0
"""


def test_value_when_the_labels_match_exactly_then_that_sample() -> None:
    samples = parse(PAGE)
    assert value(samples, "qtrader_signals_denied_total", reason="halted") == 7.0
    assert value(samples, "qtrader_intent_backlog") == 4.0


def test_value_when_labels_are_missing_or_extra_then_absent() -> None:
    samples = parse(PAGE)
    assert find(samples, "qtrader_messages_rejected_total", consumer="exec") is None
    assert find(samples, "qtrader_intent_backlog", symbol="BTCUSDT") is None
    assert value(samples, "qtrader_signals_denied_total", reason="poison") == 0.0


def test_total_when_labels_are_a_subset_then_the_sum_of_the_family() -> None:
    samples = parse(PAGE)
    assert total(samples, "qtrader_signals_denied_total") == 9.0
    assert total(samples, "qtrader_messages_rejected_total", consumer="exec") == 4.0
    assert total(samples, "qtrader_signals_dropped_total") == 0.0


def test_labelled_when_read_then_keyed_by_the_label_text_of_the_page() -> None:
    rejected = labelled(parse(PAGE), "qtrader_messages_rejected_total")
    assert rejected == {
        'consumer="exec",reason="not_json"': 3.0,
        'consumer="exec",reason="too_deep"': 1.0,
    }


def test_find_when_given_the_text_form_of_a_sample_then_refuses_it() -> None:
    with pytest.raises(ValueError, match="labels as keywords"):
        value(parse(PAGE), 'qtrader_signals_denied_total{reason="halted"}')
