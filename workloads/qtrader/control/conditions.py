"""Status conditions shaped like ``metav1.Condition``, for every custom resource's status.

``lastTransitionTime`` moves only when a condition's status flips, as the Kubernetes API
conventions ask: it is kept from the previous list otherwise, so a reconcile that only rewords
a message does not make an old state look new.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Condition = dict[str, str | int]
# (type, status, reason, message): what a resource's own evaluation says about one condition;
# a status of None is "Unknown" (the evaluation lacks what it would need to say).
Evaluated = tuple[str, bool | None, str, str]
_STATUS = {True: "True", False: "False", None: "Unknown"}


def build_conditions(
    evaluated: Sequence[Evaluated],
    *,
    generation: int | None,
    now: str,
    previous: Sequence[Mapping[str, Any]],
) -> list[Condition]:
    earlier = {c.get("type"): c for c in previous}
    conditions: list[Condition] = []
    for kind, true, reason, message in evaluated:
        flag = _STATUS[true]
        before = earlier.get(kind, {})
        since = before.get("lastTransitionTime") if before.get("status") == flag else None
        condition: Condition = {
            "type": kind,
            "status": flag,
            "lastTransitionTime": since if isinstance(since, str) else now,
            "reason": reason,
            "message": message,
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        conditions.append(condition)
    return conditions
