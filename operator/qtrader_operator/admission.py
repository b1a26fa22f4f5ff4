"""Admission: refuse an EmergencyStop reset inside its cooldown before it is stored.

The reconciler refuses such a reset anyway (and sets the spec back); the webhook only makes the
refusal immediate and visible to the person running kubectl. It needs TLS, so it is served only
where the cluster is set up for it (``QTRADER_WEBHOOK_*`` settings, see the README).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from qtrader.control.ess_status import EssState, EssStatus, format_time


def early_reset_refusal(
    *, old: Mapping[str, Any], new: Mapping[str, Any], now: datetime
) -> str | None:
    """Why this update must be refused, or None to admit it."""
    was_tripped = bool((old.get("spec") or {}).get("tripped"))
    resets = was_tripped and not bool((new.get("spec") or {}).get("tripped"))
    if not resets:
        return None
    status = EssStatus.from_dict(old.get("status") or {})
    if status.state is EssState.ARMED or status.cooldown_until is None:
        return None
    if now >= status.cooldown_until:
        return None
    return (
        f"reset refused: the cooldown runs until {format_time(status.cooldown_until)}; "
        "reset again after it"
    )
