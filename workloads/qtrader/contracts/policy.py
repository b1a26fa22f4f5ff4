"""The TradingPolicy: one typed model for the custom resource, the local file and the KV bucket.

The same YAML document (``apiVersion``/``kind``/``metadata``/``spec``) is applied with kubectl in a
cluster and passed to ``qtrader up --policy`` locally. Field names are the resource's camelCase;
Python code uses snake_case attributes. Defaults here mirror the CRD schema's defaults, so a spec
that omits a field means the same thing in both places.

``PolicyError`` carries a message that says which field is wrong and why; callers print it. A
policy file is read by ``contracts.documents`` (size cap, UTF-8, no duplicate keys), and its
symbols are checked against the listing of its mode's venue where the caller has one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from qtrader.contracts.documents import ResourceFile, read_resource_file
from qtrader.contracts.numbers import COMPUTED_PLACES, UnitFloat
from qtrader.instruments import ExchangeInfo, paper_exchange_info

API_GROUP = "qtrader.dev"
API_VERSION = "v1alpha1"
POLICY_KIND = "TradingPolicy"

SymbolName = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,20}$")]
# The CRD holds this bound too (a CEL rule on a double, which still tells 1e12 + 0.01 apart).
MAX_POLICY_USD = Decimal(1_000_000_000_000)
# USD amounts of a policy (a position limit, a capital): positive, finite, at most 1e12. Every
# policy decimal bounds its places too, so "1e-999" is refused (the CRD's 32 characters cannot
# reach the bound, so the two still agree).
PolicyUsd = Annotated[
    Decimal,
    Field(gt=0, le=MAX_POLICY_USD, decimal_places=COMPUTED_PLACES, allow_inf_nan=False),
]


class PolicyError(ValueError):
    """An invalid policy document; the message names the field and the rule it breaks."""


class _Spec(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


class TradingMode(enum.StrEnum):
    PAPER = "paper"
    TESTNET = "testnet"
    LIVE = "live"


class RiskLimits(_Spec):
    max_open_positions: int = Field(default=3, ge=1, le=100)
    max_position_usd: PolicyUsd = Decimal(1000)
    max_leverage: Decimal = Field(default=Decimal(3), ge=1, le=125, decimal_places=COMPUTED_PLACES)
    max_drawdown_pct: Decimal = Field(
        default=Decimal(3), gt=0, le=100, decimal_places=COMPUTED_PLACES
    )
    min_confidence: UnitFloat = 0.6
    max_slippage_bps: int = Field(default=20, ge=0, le=1000)


class SignalThrottling(_Spec):
    queue_size: int = Field(default=100, ge=1, le=10_000)
    max_per_cycle: int = Field(default=10, ge=1, le=1_000)
    ttl_seconds: float = Field(default=30.0, gt=0, le=3600)
    # An order intent older than this is never sent: it ends EXPIRED with its age. Bounds how
    # stale a price an order can be priced around when sending falls behind deciding.
    intent_ttl_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Intents an execution worker has decided that are not final yet; at the bound new
    # decisions are denied (backlog_full) until sending catches up.
    max_intent_backlog: int = Field(default=50, ge=1, le=10_000)


class PaperExchangeSettings(_Spec):
    initial_capital_usd: PolicyUsd = Decimal(10_000)
    fee_bps: Decimal = Field(default=Decimal(4), ge=0, le=100, decimal_places=COMPUTED_PLACES)
    slippage_bps: Decimal = Field(default=Decimal(2), ge=0, le=1000, decimal_places=COMPUTED_PLACES)


class ResourceAmounts(_Spec):
    cpu: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?m?$")
    memory: str | None = Field(default=None, pattern=r"^\d+(Ki|Mi|Gi|Ti|K|M|G|T)?$")


class Resources(_Spec):
    requests: ResourceAmounts = ResourceAmounts()
    limits: ResourceAmounts = ResourceAmounts()


class WorkloadSpec(_Spec):
    replicas: int = Field(default=1, ge=0, le=20)
    image: str | None = None
    resources: Resources = Resources()


class Workloads(_Spec):
    marketdata: WorkloadSpec = WorkloadSpec()
    inference: WorkloadSpec = WorkloadSpec()
    execution: WorkloadSpec = WorkloadSpec()
    portfolio: WorkloadSpec = WorkloadSpec()


class ModelReference(_Spec):
    # "default" is the ensemble shipped inside the package; anything else is the path of a model
    # card NAME.json, its members beside it (NAME.onnx names the card of that stem; in a
    # cluster, on a mounted volume).
    ref: str = Field(default="default", min_length=1, max_length=512)


class TradingPolicySpec(_Spec):
    mode: TradingMode = TradingMode.PAPER
    symbols: tuple[SymbolName, ...] = Field(min_length=1, max_length=50)
    risk: RiskLimits = RiskLimits()
    signals: SignalThrottling = SignalThrottling()
    paper: PaperExchangeSettings = PaperExchangeSettings()
    workloads: Workloads = Workloads()
    model: ModelReference = ModelReference()
    emergency_stop_ref: str = Field(default="main", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    policy_refresh_seconds: float = Field(default=60.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _limits_agree(self) -> TradingPolicySpec:
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError("symbols: each symbol may appear once")
        if self.signals.max_per_cycle > self.signals.queue_size:
            raise ValueError(
                f"signals.maxPerCycle ({self.signals.max_per_cycle}) exceeds "
                f"signals.queueSize ({self.signals.queue_size})"
            )
        if self.mode is TradingMode.PAPER:
            buying_power = self.paper.initial_capital_usd * self.risk.max_leverage
            if self.risk.max_position_usd > buying_power:
                raise ValueError(
                    f"risk.maxPositionUsd ({self.risk.max_position_usd}) exceeds what "
                    f"paper.initialCapitalUsd x risk.maxLeverage allows ({buying_power})"
                )
        return self


class ObjectMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None


class TradingPolicy(BaseModel):
    """The whole resource as written in YAML; ``status`` is the operator's and ignored here."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)
    api_version: Literal["qtrader.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["TradingPolicy"]
    metadata: ObjectMeta
    spec: TradingPolicySpec


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(document)"
        lines.append(f"{where}: {error['msg']}")
    return "; ".join(lines)


def parse_policy(document: object) -> TradingPolicy:
    if not isinstance(document, dict):
        raise PolicyError("a TradingPolicy document must be a YAML mapping")
    try:
        return TradingPolicy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(f"invalid TradingPolicy: {format_validation_error(exc)}") from exc


def offline_listings() -> dict[TradingMode, ExchangeInfo]:
    """The listings a command can check a policy's symbols against without the network: the
    paper exchange's. Testnet and live symbols are checked by execution when it starts, against
    the venue's exchangeInfo (an order for an unlisted symbol is denied)."""
    return {TradingMode.PAPER: paper_exchange_info()}


def load_policy_file(
    path: Path, *, listings: Mapping[TradingMode, ExchangeInfo] | None = None
) -> TradingPolicy:
    """Read a TradingPolicy YAML file (the same file kubectl applies).

    ``listings`` holds, per mode, the instruments its venue trades (the paper exchange's for
    paper); each of ``spec.symbols`` must be listed there. A mode without a listing is not
    checked here: its venue's listing is not at hand (execution denies an unlisted symbol).
    A refusal reads ``FILE:LINE: problem``, the line that of the offending field.
    """
    resource = read_resource_file(path, kind=POLICY_KIND, error=PolicyError)
    try:
        policy = TradingPolicy.model_validate(resource.document)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PolicyError(
            resource.problem(first["loc"], f"invalid TradingPolicy: {format_validation_error(exc)}")
        ) from exc
    listing = (listings or {}).get(policy.spec.mode)
    if listing is not None:
        _check_listed(resource, policy.spec, listing)
    return policy


def _check_listed(resource: ResourceFile, spec: TradingPolicySpec, listing: ExchangeInfo) -> None:
    unlisted = listing.unlisted(list(spec.symbols))
    if unlisted:
        where = ("spec", "symbols", spec.symbols.index(unlisted[0]))
        raise PolicyError(
            resource.problem(
                where,
                f"spec.symbols: {', '.join(unlisted)} not listed by the {spec.mode.value} "
                f"exchange (it lists {', '.join(sorted(listing.instruments))})",
            )
        )
