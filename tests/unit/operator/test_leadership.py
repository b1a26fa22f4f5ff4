"""kopf's peering rule, as the operator reads it back: who leads, from a peering status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from qtrader_operator.leadership import leads, others_live, priority_from_start

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _entry(priority: int, *, seen_s_ago: float = 0.0, lifetime: int = 3) -> dict[str, Any]:
    seen = NOW - timedelta(seconds=seen_s_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"a": _entry(200), "b": _entry(100)}, True),  # the highest live priority leads
        ({"a": _entry(100), "b": _entry(200)}, False),  # a higher live peer: stand by
        ({"a": _entry(100), "b": _entry(200, seen_s_ago=3.5)}, True),  # it died: follow
        ({"a": _entry(100), "b": _entry(100)}, False),  # equal priorities freeze, as in kopf
        ({"b": _entry(50)}, False),  # own entry missing: kopf's keep-alive is not through
        ({"a": _entry(200, seen_s_ago=4), "b": _entry(100)}, False),  # own entry expired
        ({"a": _entry(100), "b": None}, True),  # a removed entry (null) is nobody
        ({"a": _entry(100), "b": {"priority": 500, "lastseen": "garbage"}}, True),
    ],
)
def test_leads_when_kopfs_rule_says_so(status: dict[str, Any], expected: bool) -> None:
    own = status.get("a")
    priority = own["priority"] if own else 100
    assert leads(status, identity="a", priority=priority, now=NOW) is expected


def test_others_live_counts_only_live_entries_of_other_replicas() -> None:
    assert others_live({"a": _entry(1), "b": _entry(2)}, identity="a", now=NOW)
    assert not others_live({"a": _entry(1), "b": _entry(2, seen_s_ago=9)}, identity="a", now=NOW)
    assert not others_live({"a": _entry(1)}, identity="a", now=NOW)


def test_priority_is_higher_the_earlier_a_replica_started_and_exact_in_json() -> None:
    older = priority_from_start(now_ms=1_800_000_000_000, tie_break=999)
    newer = priority_from_start(now_ms=1_800_000_000_001, tie_break=0)
    assert older > newer > 0
    assert older < 2**53
