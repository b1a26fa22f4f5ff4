"""The TradingPolicy: one typed model for the custom resource, the local file and the KV bucket.

The same YAML document (``apiVersion``/``kind``/``metadata``/``spec``) is applied with kubectl in a
cluster and passed to ``qtrader up --policy`` locally. Field names are the resource's camelCase;
Python code uses snake_case attributes. Defaults here mirror the CRD schema's defaults, so a spec
that omits a field means the same thing in both places.

``PolicyError`` carries a message that says which field is wrong and why; callers print it.
"""

from __future__ import annotations

import enum
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from qtrader.contracts.documents import read_resource
from qtrader.contracts.numbers import QUOTED_PLACES, PositiveMoney, UnitFloat

API_GROUP = "qtrader.dev"
API_VERSION = "v1alpha1"
POLICY_KIND = "TradingPolicy"

SymbolName = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,20}$")]


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
    max_position_usd: PositiveMoney = Decimal(1000)
    max_leverage: Decimal = Field(default=Decimal(3), ge=1, le=125, decimal_places=QUOTED_PLACES)
    max_drawdown_pct: Decimal = Field(
        default=Decimal(3), gt=0, le=100, decimal_places=QUOTED_PLACES
    )
    min_confidence: UnitFloat = 0.6
    max_slippage_bps: int = Field(default=20, ge=0, le=1000)


class SignalThrottling(_Spec):
    queue_size: int = Field(default=100, ge=1, le=10_000)
    max_per_cycle: int = Field(default=10, ge=1, le=1_000)
    ttl_seconds: float = Field(default=30.0, gt=0, le=3600)


class PaperExchangeSettings(_Spec):
    initial_capital_usd: PositiveMoney = Decimal(10_000)
    fee_bps: Decimal = Field(default=Decimal(4), ge=0, le=100, decimal_places=QUOTED_PLACES)
    slippage_bps: Decimal = Field(default=Decimal(2), ge=0, le=1000, decimal_places=QUOTED_PLACES)


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


def load_policy_file(path: Path) -> TradingPolicy:
    """Read a TradingPolicy YAML file (the same file kubectl applies)."""
    return parse_policy(read_resource(path, kind=POLICY_KIND, error=PolicyError))
