"""A stop's policySelector selects policies with Kubernetes' label-selector semantics."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from qtrader.control.ess_resource import EmergencyStopError, parse_spec
from qtrader.control.policy_selector import PolicyScope, PolicySelector, covers

LABELS = {"desk": "btc", "tier": "1", "team.example.com/owner": "alice"}


def _selects(document: dict[str, Any], labels: dict[str, str] = LABELS) -> bool:
    return PolicySelector.model_validate(document).selects(labels)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({}, True),  # an empty selector selects everything, as in Kubernetes
        ({"matchLabels": {"desk": "btc"}}, True),
        ({"matchLabels": {"desk": "btc", "tier": "2"}}, False),  # every label must match
        ({"matchLabels": {"region": "eu"}}, False),
        ({"matchExpressions": [{"key": "desk", "operator": "In", "values": ["eth", "btc"]}]}, True),
        ({"matchExpressions": [{"key": "desk", "operator": "In", "values": ["eth"]}]}, False),
        ({"matchExpressions": [{"key": "desk", "operator": "NotIn", "values": ["eth"]}]}, True),
        ({"matchExpressions": [{"key": "desk", "operator": "NotIn", "values": ["btc"]}]}, False),
        # NotIn holds for a policy without the label at all (Kubernetes' rule)
        ({"matchExpressions": [{"key": "region", "operator": "NotIn", "values": ["eu"]}]}, True),
        ({"matchExpressions": [{"key": "team.example.com/owner", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "region", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "region", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "desk", "operator": "DoesNotExist"}]}, False),
        (
            {
                "matchLabels": {"desk": "btc"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["2"]}],
            },
            False,  # matchLabels and every expression must all hold
        ),
    ],
)
def test_selects_as_kubernetes_does(document: dict[str, Any], expected: bool) -> None:
    assert _selects(document) is expected


@pytest.mark.parametrize(
    "document",
    [
        {"matchExpressions": [{"key": "desk", "operator": "In"}]},
        {"matchExpressions": [{"key": "desk", "operator": "NotIn", "values": []}]},
        {"matchExpressions": [{"key": "desk", "operator": "Exists", "values": ["x"]}]},
        {"matchExpressions": [{"key": "desk", "operator": "Matches", "values": ["x"]}]},
        {"matchLabels": {"desk": "not a label value"}},
        {"matchLabels": {"-bad-key": "x"}},
        {"matchLabel": {"desk": "btc"}},  # a typo never silently selects everything
    ],
)
def test_a_selector_kubernetes_would_refuse_is_refused(document: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PolicySelector.model_validate(document)


def test_the_stop_a_policy_names_always_covers_it() -> None:
    policy = PolicyScope(labels={"desk": "eth"}, stop_ref="main")
    btc = PolicySelector.model_validate({"matchLabels": {"desk": "btc"}})
    assert covers(stop="main", selector=btc, policy=policy)
    assert not covers(stop="btc-desk", selector=btc, policy=policy)
    assert covers(stop="other", selector=None, policy=policy)


def test_the_stop_spec_reads_and_refuses_its_selector() -> None:
    spec = parse_spec({"policySelector": {"matchLabels": {"desk": "btc"}}})
    assert spec.policy_selector is not None
    assert spec.policy_selector.selects({"desk": "btc"})
    assert spec.to_document()["policySelector"] == {
        "matchLabels": {"desk": "btc"},
        "matchExpressions": [],
    }
    assert parse_spec({}).policy_selector is None
    with pytest.raises(EmergencyStopError, match="policySelector"):
        parse_spec({"policySelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}})
