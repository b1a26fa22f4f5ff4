"""Which TradingPolicies an EmergencyStop covers: a Kubernetes label selector, and the rule.

A stop without ``policySelector`` covers every policy of its namespace. A stop with one covers
the policies whose labels it selects, with Kubernetes' own semantics (``matchLabels`` and every
``matchExpressions`` term must hold; ``In``, ``NotIn``, ``Exists``, ``DoesNotExist``; an empty
selector selects everything), so ``kubectl get tradingpolicies -l <selector>`` lists exactly
the policies it covers. The stop a policy names in ``emergencyStopRef`` always covers it,
whatever its selector says: a policy can never be left outside its own kill switch.

A policy obeys the most restrictive state of the stops covering it (``halt_combination``). A
stop whose selector does not select a policy never halts it, so changing a policy's labels
can move it out of a tripped stop's reach: that is the selector doing its job, and it is
visible (the latch's ``held_by`` in that policy's stack changes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator
from pydantic.alias_generators import to_camel

# A label key: an optional DNS-subdomain prefix and a name of at most 63 characters.
LabelKey = Annotated[
    StrictStr,
    Field(
        max_length=317,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$",
    ),
]
LabelValue = Annotated[
    StrictStr, Field(max_length=63, pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
]
Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class _Camel(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


class SelectorRequirement(_Camel):
    """One ``matchExpressions`` term."""

    key: LabelKey
    operator: Operator
    values: tuple[LabelValue, ...] = ()

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> SelectorRequirement:
        # The API server's own rule for label selectors.
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"policySelector: {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"policySelector: {self.operator} takes no values")
        return self

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # NotIn: also true without the label


class PolicySelector(_Camel):
    """A Kubernetes ``LabelSelector`` over TradingPolicies' labels."""

    match_labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            term.holds(labels) for term in self.match_expressions
        )


@dataclass(frozen=True, kw_only=True)
class PolicyScope:
    """What decides which stops cover one policy: its labels and the stop it names (None when
    its spec cannot be read: then no stop counts as its own, and it stays halted)."""

    labels: Mapping[str, str]
    stop_ref: str | None


def covers(*, stop: str, selector: PolicySelector | None, policy: PolicyScope) -> bool:
    """Whether stop ``stop`` (with ``selector``) covers ``policy`` (module docstring)."""
    return stop == policy.stop_ref or selector is None or selector.selects(policy.labels)
