"""The EmergencyStop resource in YAML: one typed model for kubectl, local mode and the operator.

The same document (``apiVersion: qtrader.dev/v1alpha1``, ``kind: EmergencyStop``) is applied with
kubectl in a cluster and passed to ``qtrader up --ess`` locally. ``EmergencyStopSpec`` mirrors the
CRD's ``spec`` schema: camelCase field names, the CRD's defaults, its enums and bounds, and its CEL
rules with the same messages ("a reason is required when tripping"). Unknown fields are rejected,
as kubectl's strict field validation rejects them, so a typo never silently disables a setting.

Why strict types: the API server does not coerce (``cooldownSeconds: "5"`` is a type error, and so
is ``tripped: "yes"``), and trigger percentages are decimal *strings* there; accepting more here
would let a file work locally that kubectl refuses.

``to_ess_spec(tripped_by=...)`` gives the pure state machine's input (``qtrader.control.ess``);
``with_patch`` applies a merge patch to the spec and validates the result, as the API server does
with ``kubectl patch``. ``status_document`` assembles the CRD's ``status`` (state machine fields,
conditions, acknowledgements, pending workers) for whichever control plane persists it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from qtrader.contracts.documents import read_resource_file
from qtrader.contracts.messages import RiskAlert, RiskAlertKind, TradingState
from qtrader.contracts.policy import API_GROUP, API_VERSION
from qtrader.control.ess import TRIPPED_BY_ANNOTATION
from qtrader.control.ess_conditions import status_conditions
from qtrader.control.ess_status import EssMode, EssSpec, EssStatus, format_time
from qtrader.control.open_positions import PositionsSeen
from qtrader.control.policy_selector import PolicySelector

ESS_KIND = "EmergencyStop"
ESS_API_VERSION = f"{API_GROUP}/{API_VERSION}"
REASON_REQUIRED = "a reason is required when tripping"  # the CRD's CEL message

ResourceName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
# The CRD's decimal-string percentages: digits, optionally a fraction, no sign, no exponent.
PercentText = Annotated[StrictStr, Field(max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?$")]
Seconds1To3600 = Annotated[StrictInt, Field(ge=1, le=3600)]


class EmergencyStopError(ValueError):
    """An invalid EmergencyStop document or patch; the message names the field and the rule."""


class _Camel(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


class EssTriggers(_Camel):
    """Automatic trips; an absent threshold turns that trip off (evaluated by the operator)."""

    drawdown_pct: PercentText | None = None
    flash_crash_pct: PercentText | None = None
    flash_crash_window_seconds: Seconds1To3600 = 60
    stale_market_data_seconds: Seconds1To3600 | None = None
    execution_error_rate: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None

    @field_validator("drawdown_pct", "flash_crash_pct")
    @classmethod
    def _percent_in_range(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not Decimal(0) < Decimal(value) <= Decimal(100):
            name = to_camel(info.field_name or "")
            raise ValueError(f"triggers.{name} must be greater than 0 and at most 100")
        return value


def trigger_threshold(triggers: EssTriggers | None, kind: RiskAlertKind) -> Decimal | None:
    """The stop's threshold for one kind of risk alert; None when that automatic trip is off.

    An exchange ban and a reconciliation alert (positions or wallet) have no threshold: they
    always trip (see ``ALWAYS_TRIPS``).
    """
    if triggers is None:
        return None
    value: str | int | float | None = {
        RiskAlertKind.DRAWDOWN: triggers.drawdown_pct,
        RiskAlertKind.FLASH_CRASH: triggers.flash_crash_pct,
        RiskAlertKind.STALE_MARKET_DATA: triggers.stale_market_data_seconds,
        RiskAlertKind.EXECUTION_ERROR_RATE: triggers.execution_error_rate,
    }.get(kind)
    return None if value is None else Decimal(str(value))


# No threshold to set: a ban stops every order anyway, a position the venue holds that the
# book cannot explain makes every limit judged on a wrong position, and money in the wallet that
# no fill and no income row explains makes the equity every order is sized on (and the drawdown
# trigger watches) wrong by an unknown cause (qtrader.portfolio.wallet_check says why it only
# trips on a difference that persists over settled reads).
ALWAYS_TRIPS = frozenset(
    {
        RiskAlertKind.EXCHANGE_BAN,
        RiskAlertKind.RECONCILIATION,
        RiskAlertKind.WALLET_RECONCILIATION,
    }
)


# The venue holds what the ledger cannot explain. Reducing by default: the book may be wrong, so
# nothing may add to a position, but closing what is held stays possible (reduce-only orders
# cannot open anything at the venue, whatever the book believes); ``reconciliationMode:
# Halted`` stops everything instead.
RECONCILIATION_KINDS = frozenset(
    {RiskAlertKind.RECONCILIATION, RiskAlertKind.WALLET_RECONCILIATION}
)


def trip_mode(alert: RiskAlert, spec: EmergencyStopSpec) -> EssMode | None:
    """The mode ``alert`` trips the stop in when that is not simply the stop's own."""
    return spec.reconciliation_mode if alert.alert_kind in RECONCILIATION_KINDS else None


def alert_trips(alert: RiskAlert, triggers: EssTriggers | None) -> bool:
    """Whether ``alert`` trips a stop with these triggers: a ban or a reconciliation always
    does; any other kind when the stop's trigger for it is set and the alert's figure reaches
    the stop's threshold.

    Comparing the figure, not just the kind, lets alerts raised against another threshold (the
    portfolio's, at the policy's ``risk.maxDrawdownPct``) trip only the stops they breach.
    """
    if alert.alert_kind in ALWAYS_TRIPS:
        return True
    threshold = trigger_threshold(triggers, alert.alert_kind)
    return threshold is not None and alert.value >= threshold


class EmergencyStopSpec(_Camel):
    """The CRD's ``spec``, with its defaults: armed, Halted, 300 s cooldown, manual reset."""

    tripped: StrictBool = False
    reason: Annotated[StrictStr, Field(max_length=1024)] = ""
    mode: EssMode = EssMode.HALTED
    cooldown_seconds: Annotated[StrictInt, Field(ge=0, le=86_400)] = 300
    require_manual_reset: StrictBool = True
    triggers: EssTriggers | None = None
    flatten_on_trip: StrictBool = False
    ack_timeout_seconds: Annotated[StrictInt, Field(ge=1, le=300)] = 5
    # None: the stop covers every TradingPolicy of its namespace (``policy_selector``).
    policy_selector: PolicySelector | None = None
    # The mode a reconciliation alert trips the stop in (``RECONCILIATION_KINDS``).
    reconciliation_mode: EssMode = EssMode.REDUCING

    @model_validator(mode="after")
    def _reason_when_tripped(self) -> EmergencyStopSpec:
        if self.tripped and not self.reason:
            raise ValueError(REASON_REQUIRED)
        return self

    def to_ess_spec(self, *, tripped_by: str) -> EssSpec:
        """The state machine's input; ``tripped_by`` comes from the tripped-by annotation."""
        return EssSpec(
            tripped=self.tripped,
            reason=self.reason,
            mode=self.mode,
            cooldown_seconds=self.cooldown_seconds,
            require_manual_reset=self.require_manual_reset,
            tripped_by=tripped_by,
            flatten_on_trip=self.flatten_on_trip,
        )

    def to_document(self) -> dict[str, Any]:
        """The camelCase form, as it reads in YAML (absent triggers stay absent)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def with_patch(self, patch: Mapping[str, Any]) -> EmergencyStopSpec:
        """This spec after a JSON merge patch (``{"tripped": true, "reason": ...}``), validated."""
        return parse_spec({**self.to_document(), **patch})


class ResourceMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    name: ResourceName
    namespace: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict)


class EmergencyStop(BaseModel):
    """The whole resource as written in YAML; ``status`` is the control plane's and ignored here."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)
    api_version: Literal["qtrader.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["EmergencyStop"]
    metadata: ResourceMeta
    spec: EmergencyStopSpec

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def tripped_by(self) -> str:
        """Who tripped it, from the ``qtrader.dev/tripped-by`` annotation ("" when absent)."""
        return self.metadata.annotations.get(TRIPPED_BY_ANNOTATION, "")


def default_emergency_stop(name: str) -> EmergencyStop:
    """An EmergencyStop with the CRD's defaults only: armed, Halted, 300 s cooldown."""
    return EmergencyStop(
        api_version=ESS_API_VERSION,
        kind="EmergencyStop",
        metadata=ResourceMeta(name=name),
        spec=EmergencyStopSpec(),
    )


def parse_spec(document: object) -> EmergencyStopSpec:
    if not isinstance(document, dict):
        raise EmergencyStopError("an EmergencyStop spec must be a mapping")
    try:
        return EmergencyStopSpec.model_validate(document)
    except ValidationError as exc:
        raise EmergencyStopError(f"invalid EmergencyStop: {_where(exc, 'spec')}") from exc


def parse_emergency_stop(document: object) -> EmergencyStop:
    if not isinstance(document, dict):
        raise EmergencyStopError("an EmergencyStop document must be a YAML mapping")
    try:
        return EmergencyStop.model_validate(document)
    except ValidationError as exc:
        raise EmergencyStopError(f"invalid EmergencyStop: {_where(exc, '')}") from exc


def load_emergency_stop_file(path: Path) -> EmergencyStop:
    """Read the one EmergencyStop of a YAML file (the same file kubectl applies).

    The file is read by ``contracts.documents`` (size cap, UTF-8, no duplicate keys); a refusal
    reads ``FILE:LINE: problem``, the line that of the first offending field.
    """
    resource = read_resource_file(path, kind=ESS_KIND, error=EmergencyStopError)
    try:
        return EmergencyStop.model_validate(resource.document)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = f"invalid EmergencyStop: {_where(exc, '')}"
        raise EmergencyStopError(resource.problem(first["loc"], message)) from exc


def _where(exc: ValidationError, prefix: str) -> str:
    """Each error as ``field.path: message``, camelCase as in YAML; a rule on the whole spec is
    reported on ``spec`` (the CRD puts its CEL rule there too)."""
    lines = []
    for error in exc.errors():
        path = ".".join(part for part in (prefix, *map(str, error["loc"])) if part)
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '(document)'}: {message}")
    return "; ".join(lines)


# --- status -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Acknowledgement:
    """One worker's answer to the halt latch, as ``status.acknowledgements`` lists it."""

    worker: str
    revision: int
    at: datetime
    state: TradingState
    open_orders_cancelled: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "revision": self.revision,
            "at": format_time(self.at),
            "state": self.state.value,
            "openOrdersCancelled": self.open_orders_cancelled,
        }


def status_document(
    status: EssStatus,
    *,
    generation: int,
    now: datetime,
    previous_conditions: Sequence[Mapping[str, Any]],
    acknowledgements: Sequence[Acknowledgement],
    pending_workers: Sequence[str],
    overdue_workers: Sequence[str] = (),
    held_by: Sequence[str] = (),
    positions: PositionsSeen | None = None,
    flattens: bool = False,
) -> dict[str, Any]:
    """The CRD ``status``: the state machine's fields (``None`` where absent, which a merge patch
    deletes), conditions, each known worker's acknowledgement, the workers still pending and
    the stops holding the halt in force (``heldBy``). ``positions``: the open positions of the
    stacks the stop covers (``PositionsOpen``; None: not followed)."""
    return {
        **status.to_dict(),
        "observedGeneration": generation,
        "conditions": status_conditions(
            status,
            generation=generation,
            now=now,
            previous=previous_conditions,
            overdue_workers=overdue_workers,
            positions=positions,
            flattens=flattens,
        ),
        "acknowledgements": [a.to_dict() for a in sorted(acknowledgements, key=lambda a: a.worker)],
        "pendingWorkers": sorted(pending_workers),
        "heldBy": sorted(held_by),
    }
