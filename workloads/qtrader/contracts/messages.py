"""Typed, versioned wire messages, imported by every producer and consumer.

Each message is a frozen pydantic model that carries ``kind`` and ``schema_version``. Money and
quantities are ``Decimal`` and travel as JSON strings, so no float ever touches a price on the
wire; each is one of the bounded types of ``contracts.numbers`` (finite, in a sane range, with
bounded decimal places), so ``"1e999"`` or ``"NaN"`` never reaches arithmetic. Timestamps and
counters are bounded too. ``decode`` turns bytes into a model or raises ``MessageRejected`` with a
bounded ``reason`` that consumers count in a metric before skipping the message; it raises
nothing else for any input, so a consumer never crashes on input.

Versioning rule: a change that old readers cannot ignore bumps ``SCHEMA_VERSION`` of that kind;
readers accept exactly the versions they know (``ACCEPTED_VERSIONS``).

Packs. A kind marked ``PACKABLE`` (candles) may also travel as a ``Pack``: one wire message
holding several messages of that kind (``{"kind": "pack", "of": "candle", "items": [...]}``), so
a step of 16 symbols costs the broker and every reader one message instead of 16. A pack is a
way of carrying messages, not a message of its own: ``decode_all`` hands its items over one by
one, each checked by exactly the rules of a message sent alone, and refuses a bad item on its
own (the others are delivered); a pack of a kind that is not packable, or whose items are of
another kind, is refused whole. Its ``dedup_id`` is made of its items' ids, so the same items
packed again are dropped by the stream as a repeat.

Control data (the halt latch, the policy, a stored EmergencyStop) is read from KV keys, where a
value that does not decode cannot simply be skipped: the reader must decide (the latch halts,
the policy keeps the last good one). The bus hands such a value over as ``Undecodable`` (where it
was, its revision and why), a result the type checker makes every reader handle.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qtrader.contracts.numbers import (
    AveragePrice,
    Figure,
    FilledQuantity,
    Money,
    NonNegativeMoney,
    Percent,
    PositiveMoney,
    Price,
    Quantity,
    SignedQuantity,
    UnitFloat,
    Volume,
)
from qtrader.contracts.policy import TradingPolicySpec

Symbol = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,20}$")]
# A coin's ticker as the venue names it (USDT, BNB): what a commission is charged in.
Asset = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,20}$")]
SETTLEMENT_ASSET = "USDT"
# Epoch milliseconds up to the end of year 9999: beyond that ``datetime`` cannot show a time,
# and a reader that converts one must not fail on a message that decoded.
MAX_MILLIS = 253_402_300_799_999
Millis = Annotated[int, Field(ge=0, le=MAX_MILLIS)]
# Revisions, sequences and counts: JetStream's are unsigned 64-bit; ours stay inside int64.
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Message(BaseModel):
    """Base of every wire message: frozen, strict about unknown fields, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    KIND: ClassVar[str]
    # Whether this kind may also travel in a ``Pack`` (only where the contract says so).
    PACKABLE: ClassVar[bool] = False
    SCHEMA_VERSION: ClassVar[int] = 1
    ACCEPTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})

    schema_version: int = 1

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @property
    def dedup_id(self) -> str:
        """The Nats-Msg-Id: the same event always gets the same id, so JetStream drops repeats."""
        raise NotImplementedError(f"{type(self).__name__} must define dedup_id")


# Larger than any message we write (a policy revision is a few KiB); a bigger payload is
# refused before parsing, so a huge value costs no parse time and no memory beyond its bytes.
MAX_MESSAGE_BYTES = 256 * 1024


class RejectReason(enum.StrEnum):
    """Why a message was skipped; the label values of the rejection metric (bounded)."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    WRONG_KIND = "wrong_kind"
    UNKNOWN_VERSION = "unknown_version"
    INVALID_FIELDS = "invalid_fields"


class MessageRejected(Exception):
    """A message that cannot be decoded; carries the reason for the metric and the log line."""

    MAX_DETAIL_CHARS = 300  # a detail quotes the input; a huge input must not flood the log

    def __init__(self, reason: RejectReason, detail: str) -> None:
        if len(detail) > self.MAX_DETAIL_CHARS:
            detail = detail[: self.MAX_DETAIL_CHARS - 3] + "..."
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Undecodable:
    """A stored value that does not decode: a result, not an error, so its reader decides.

    ``source`` names where it is stored (``bucket/key``, or a stream's subject) and
    ``stored_revision`` its KV revision (or stream sequence), so a person can find and replace it.
    """

    source: str
    # Not ``revision``: a reader that took this for a message (both would have a revision)
    # would compute with it unawares.
    stored_revision: int
    reason: RejectReason
    detail: str

    @classmethod
    def of(cls, rejected: MessageRejected, *, source: str, stored_revision: int) -> Undecodable:
        return cls(
            source=source,
            stored_revision=stored_revision,
            reason=rejected.reason,
            detail=rejected.detail,
        )

    def __str__(self) -> str:
        return f"revision {self.stored_revision} of {self.source} does not decode: {self.why}"

    @property
    def why(self) -> str:
        return f"{self.reason.value}: {self.detail}"

    def rejected(self) -> MessageRejected:
        """As an error, for a reader that cannot go on without the value (a command, one
        round of a control loop) and already handles ``MessageRejected``."""
        return MessageRejected(
            self.reason, f"{self.source} revision {self.stored_revision}: {self.detail}"
        )


M = TypeVar("M", bound=Message)
T = TypeVar("T")


def _refuse_constant(name: str) -> object:
    """``json.loads`` would make NaN and Infinity floats; no message of ours holds one."""
    raise ValueError(f"{name} is not a number any message carries")


# One decoder for every message: ``json.loads`` with an argument makes a new one per call.
_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _holds_lone_surrogate(document: object) -> bool:
    """Whether any key or string in the parsed ``document`` cannot be encoded as UTF-8."""
    pending = [document]
    while pending:  # a loop, not recursion: the document may be nested as deep as json allows
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


class Build(Protocol):
    """How a message is made: ``validated``, or ``trusted`` where its values are known valid."""

    def __call__(self, message_type: type[M], /, **fields: Any) -> M: ...


def validated(message_type: type[M], /, **fields: Any) -> M:
    return message_type(**fields)


def trusted(message_type: type[M], /, **fields: Any) -> M:
    """``message_type(**fields)`` without validating the values: for a loop that builds
    messages only from values known to be valid (a backtest: fields of messages validated
    before, closes checked when read), where validation would be most of its cost.

    The message is the one validation gives: the same values and defaults in field order, the
    same fields set, equal and encoded to the same bytes (``test_trusted_messages``). A missing
    or unknown field is still an error. What ``model_construct`` does, without its generality
    (aliases, extras, private attributes: our messages have none), which makes it slower than
    validating.
    """
    layout = _LAYOUTS.get(message_type)  # a dict read: cheaper than the cache's call
    if layout is None:
        layout = _LAYOUTS[message_type] = _layout(message_type)
    template, required = layout
    values = {**template, **fields}  # the fields' order: every name is in the template already
    if len(values) != len(template) or not fields.keys() >= required:
        unknown, missing = sorted(values.keys() - template.keys()), sorted(required - fields.keys())
        raise TypeError(f"{message_type.__name__}: unknown {unknown}, missing {missing}")
    message = message_type.__new__(message_type)
    _set_slot(message, "__dict__", values)
    _set_slot(message, "__pydantic_fields_set__", set(fields))
    _set_slot(message, "__pydantic_extra__", None)
    _set_slot(message, "__pydantic_private__", None)
    return message


def replaced(message: M, /, **update: Any) -> M:
    """``message.model_copy(update=update)`` for our messages (no extras, no private
    attributes): the same values unvalidated, the same fields set, at a third of its cost (the
    order driver makes one per attempt). An unknown field is an error, as in ``trusted``."""
    message_type = type(message)
    unknown = update.keys() - message.__dict__.keys()  # every field is in it
    if unknown:
        raise TypeError(f"{message_type.__name__}: unknown {sorted(unknown)}")
    copied = message_type.__new__(message_type)
    _set_slot(copied, "__dict__", {**message.__dict__, **update})
    _set_slot(copied, "__pydantic_fields_set__", message.__pydantic_fields_set__.union(update))
    _set_slot(copied, "__pydantic_extra__", None)
    _set_slot(copied, "__pydantic_private__", None)
    return copied


_set_slot = object.__setattr__  # frozen models refuse their own __setattr__
_LAYOUTS: dict[type[Message], tuple[dict[str, Any], frozenset[str]]] = {}
_REQUIRED = object()


def _layout(message_type: type[Message]) -> tuple[dict[str, Any], frozenset[str]]:
    """Every field of ``message_type`` in order with its default (``_REQUIRED`` if none), and
    the required ones."""
    template: dict[str, Any] = {}
    for name, info in message_type.model_fields.items():
        if info.default_factory is not None:
            raise TypeError(f"{message_type.__name__}.{name}: a default factory is not supported")
        template[name] = _REQUIRED if info.is_required() else info.default
    return template, frozenset(n for n, value in template.items() if value is _REQUIRED)


def decode(data: bytes, message_type: type[M]) -> M:
    """Parse ``data`` as ``message_type`` or raise ``MessageRejected`` saying why.

    Never raises anything else for any input: nesting deep enough to exhaust the parser's
    recursion, integers too long to convert and payloads over ``MAX_MESSAGE_BYTES`` are
    rejected like any other malformed input, and so is whatever else a parser or validator
    might raise (a bug there must cost one message, not the consumer).
    """
    return _guarded(message_type, lambda: _validate(_parse(data), message_type))


@dataclass(frozen=True, kw_only=True)
class Decoded(Generic[M]):
    """What one wire message carried: its messages (one, or a pack's good items, in order) and
    the pack items refused one by one."""

    messages: list[M]
    refused: list[MessageRejected]


def decode_all(data: bytes, message_type: type[M]) -> Decoded[M]:
    """``decode`` for a reader that also takes packs of ``message_type``: a message alone, or a
    pack's items each decoded by the same rules. Raises ``MessageRejected`` (and nothing else)
    only when the whole wire message is refused."""
    raw = _guarded(message_type, lambda: _parse(data))
    if not (message_type.PACKABLE and isinstance(raw, dict) and raw.get("kind") == PACK_KIND):
        return Decoded(messages=[decode_parsed(raw, message_type)], refused=[])
    items = _guarded(message_type, lambda: _pack_items(raw, message_type))
    decoded: Decoded[M] = Decoded(messages=[], refused=[])
    for item in items:
        try:  # ``decode_parsed`` inlined: a closure per item is a fifth of a candle's decoding
            decoded.messages.append(_validate(item, message_type))
        except MessageRejected as rejected:
            decoded.refused.append(rejected)
        except Exception as exc:
            decoded.refused.append(
                MessageRejected(
                    RejectReason.MALFORMED, f"{message_type.KIND}: decoding failed: {exc!r}"
                )
            )
    return decoded


def decode_parsed(raw: object, message_type: type[M]) -> M:
    return _guarded(message_type, lambda: _validate(raw, message_type))


def _guarded(message_type: type[Message], step: Callable[[], T]) -> T:
    """``step()``, with anything it raises but ``MessageRejected`` turned into one."""
    try:
        return step()
    except MessageRejected:
        raise
    except Exception as exc:
        raise MessageRejected(
            RejectReason.MALFORMED, f"{message_type.KIND}: decoding failed: {exc!r}"
        ) from exc


def _parse(data: bytes) -> object:
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageRejected(
            RejectReason.TOO_LARGE, f"{len(data)} bytes, more than {MAX_MESSAGE_BYTES}"
        )
    try:
        # Decoded here, strictly: ``json.loads`` of bytes lets UTF-8-encoded surrogates through.
        text = data.decode("utf-8")
        raw = _JSON.decode(text)
    except RecursionError as exc:
        raise MessageRejected(RejectReason.MALFORMED, "not JSON: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, digit limits, NaN
        raise MessageRejected(RejectReason.MALFORMED, f"not JSON: {exc}") from exc
    if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(raw):
        # A "\udcff" escape parses to a str that can never be encoded again: the reader would
        # fail later, re-publishing or logging it, far from the input.
        raise MessageRejected(RejectReason.MALFORMED, "a string holds a lone UTF-16 surrogate")
    return raw


def _validate(raw: object, message_type: type[M]) -> M:
    if not isinstance(raw, dict):
        raise MessageRejected(RejectReason.MALFORMED, "not a JSON object")
    kind = raw.get("kind")
    if kind != message_type.KIND:
        raise MessageRejected(
            RejectReason.WRONG_KIND, f"expected kind {message_type.KIND!r}, got {kind!r}"
        )
    version = raw.get("schema_version")
    # An exact int: a list is unhashable, and True would pass as version 1.
    if type(version) is not int or version not in message_type.ACCEPTED_VERSIONS:
        raise MessageRejected(
            RejectReason.UNKNOWN_VERSION,
            f"{kind} schema_version {version!r} not in {sorted(message_type.ACCEPTED_VERSIONS)}",
        )
    try:
        return message_type.model_validate(raw)
    except RecursionError as exc:  # deep nesting inside a field of a valid envelope
        raise MessageRejected(RejectReason.INVALID_FIELDS, f"{kind}: nested too deeply") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MessageRejected(
            RejectReason.INVALID_FIELDS, f"{kind}.{where}: {first['msg']}"
        ) from exc


# --- packs ------------------------------------------------------------------------------------

PACK_KIND = "pack"
PACK_VERSION = 1
# Enough for a step of every symbol a policy may name; few enough that a pack of candles stays
# far below MAX_MESSAGE_BYTES (a candle is about 250 bytes).
MAX_PACK_ITEMS = 256
_PACK_FIELDS = frozenset({"kind", "schema_version", "of", "items"})


@dataclass(frozen=True)
class Pack(Generic[M]):
    """Messages of one packable kind sent as one wire message (see the module's docstring)."""

    items: tuple[M, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.items) <= MAX_PACK_ITEMS:
            raise ValueError(f"a pack holds 1 to {MAX_PACK_ITEMS} messages, not {len(self.items)}")
        kinds = {type(item) for item in self.items}
        if len(kinds) != 1 or not self.items[0].PACKABLE:
            raise ValueError(f"a pack holds messages of one packable kind, not {kinds}")

    @property
    def KIND(self) -> str:  # read like a message's kind by the publisher
        return self.items[0].KIND

    def encode(self) -> bytes:
        head = (
            f'{{"kind":"{PACK_KIND}","schema_version":{PACK_VERSION},"of":"{self.KIND}","items":['
        )
        return head.encode() + b",".join(item.encode() for item in self.items) + b"]}"

    @property
    def dedup_id(self) -> str:
        """The same items packed again are the same pack (and the same items only)."""
        ids = "\n".join(item.dedup_id for item in self.items).encode()
        return f"{PACK_KIND}:{self.KIND}:{len(self.items)}:{hashlib.sha256(ids).hexdigest()}"


def _pack_items(raw: dict[str, Any], message_type: type[Message]) -> list[object]:
    """The items of a pack of ``message_type``; refuses the pack whole when it is not one."""
    unknown = raw.keys() - _PACK_FIELDS
    if unknown:
        raise MessageRejected(
            RejectReason.INVALID_FIELDS, f"pack: unknown fields {sorted(unknown)}"
        )
    version = raw.get("schema_version")
    if type(version) is not int or version != PACK_VERSION:
        raise MessageRejected(
            RejectReason.UNKNOWN_VERSION, f"pack schema_version {version!r} not in [{PACK_VERSION}]"
        )
    if raw.get("of") != message_type.KIND:
        raise MessageRejected(
            RejectReason.WRONG_KIND,
            f"expected a pack of {message_type.KIND!r}, got one of {raw.get('of')!r}",
        )
    items = raw.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_PACK_ITEMS:
        raise MessageRejected(
            RejectReason.INVALID_FIELDS, f"pack.items: not a list of 1 to {MAX_PACK_ITEMS} messages"
        )
    return items


# --- market data ------------------------------------------------------------------------------


class CandleSource(enum.StrEnum):
    REPLAY = "replay"
    SYNTHETIC = "synthetic"
    LIVE = "live"
    # History a live feed fetched over REST before its first candle, so a model's window is
    # full from the first live candle on. Old when published: it fills windows, and inference
    # makes no signal of it. (A LIVE candle's signal is stamped at the candle's close, so the
    # signal TTL refuses one made late; a warm-up candle makes none at all.)
    WARMUP = "warmup"


class Candle(Message):
    """One closed kline, as Binance's 12-column format describes it."""

    KIND = "candle"
    PACKABLE = True  # a step's candles of every symbol travel together (``Pack``)
    kind: Literal["candle"] = "candle"
    symbol: Symbol
    interval: str = Field(pattern=r"^\d+[smhdw]$")
    open_time_ms: Millis
    close_time_ms: Millis
    open: Price
    high: Price
    low: Price
    close: Price
    volume: Volume
    trades: Count = 0
    source: CandleSource

    @property
    def dedup_id(self) -> str:
        return f"candle:{self.symbol}:{self.interval}:{self.open_time_ms}"


# --- signals ----------------------------------------------------------------------------------


class Direction(enum.StrEnum):
    """What the model wants the position to be."""

    LONG = "LONG"
    SHORT = "SHORT"
    FLAT = "FLAT"


class Signal(Message):
    KIND = "signal"
    # The signals of a candle pack travel together (``Pack``): one message per step, not per
    # symbol. Made from one candle pack, so a pack delivered again makes the very same one.
    PACKABLE = True
    kind: Literal["signal"] = "signal"
    signal_id: str = Field(min_length=1, max_length=128)
    symbol: Symbol
    direction: Direction
    confidence: UnitFloat
    model_version: str = Field(min_length=1, max_length=64)
    candle_open_time_ms: Millis
    price: Price
    created_at_ms: Millis

    @property
    def dedup_id(self) -> str:
        return f"signal:{self.signal_id}"


# --- orders and fills -------------------------------------------------------------------------


class Side(enum.StrEnum):
    BUY = "BUY"
    SELL = "SELL"

    @property
    def sign(self) -> int:
        return 1 if self is Side.BUY else -1


class OrderType(enum.StrEnum):
    MARKET = "MARKET"
    LIMIT = "LIMIT"


class OrderIntent(Message):
    """The decision to place one order; ``client_order_id`` is derived from it deterministically."""

    KIND = "order_intent"
    kind: Literal["order_intent"] = "order_intent"
    intent_id: str = Field(min_length=1, max_length=128)
    client_order_id: str = Field(pattern=r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
    symbol: Symbol
    side: Side
    quantity: Quantity
    order_type: OrderType = OrderType.MARKET
    limit_price: Price | None = None
    reduce_only: bool = False
    reference_price: Price
    signal_id: str | None = None
    policy_revision: Count
    created_at_ms: Millis

    @property
    def dedup_id(self) -> str:
        return f"intent:{self.intent_id}"


class OrderStatus(enum.StrEnum):
    """Binance's order states plus two of ours: PENDING_NEW, recorded and about to be sent, and
    UNKNOWN, sent with its outcome not yet known (looked up, never re-sent blindly)."""

    PENDING_NEW = "PENDING_NEW"
    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    UNKNOWN = "UNKNOWN"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_STATUSES


_FINAL_STATUSES = frozenset(
    {OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.REJECTED, OrderStatus.EXPIRED}
)


class RefusedBy(enum.StrEnum):
    """Our own check that ended an order before any venue saw it."""

    HALT_GATE = "halt-gate"
    EXPOSURE_BOOK = "exposure-book"


class ErrorKind(enum.StrEnum):
    """What kind of exchange error ended (or left unknown) an order; one per error type of
    ``qtrader.exchange.errors`` (each names its kind), so readers decide on a field, not on
    the wording of a reason."""

    REJECTED = "rejected"
    FILTER_VIOLATION = "filter_violation"
    RATE_LIMITED = "rate_limited"
    BANNED = "banned"
    TRANSIENT = "transient"
    OUTCOME_UNKNOWN = "outcome_unknown"
    NOT_SENT = "not_sent"
    CLOCK_SKEW = "clock_skew"
    OTHER = "other"


# Version 1 said both in strings: the refusing check as ``exchange``, the error type's class
# name (or "exchange ban") at the start of ``reason``. Read only to upgrade a version 1 update.
_V1_ERROR_PREFIXES: tuple[tuple[str, ErrorKind], ...] = (
    ("exchange ban", ErrorKind.BANNED),
    ("FilterViolation", ErrorKind.FILTER_VIOLATION),
    ("Rejected", ErrorKind.REJECTED),
    ("RateLimited", ErrorKind.RATE_LIMITED),
    ("Banned", ErrorKind.BANNED),
    ("Transient", ErrorKind.TRANSIENT),
    ("OutcomeUnknown", ErrorKind.OUTCOME_UNKNOWN),
    ("NotSent", ErrorKind.NOT_SENT),
    ("ClockSkew", ErrorKind.CLOCK_SKEW),
    ("ExchangeError", ErrorKind.OTHER),
)


class OrderUpdate(Message):
    """An order's state as execution reports it on ORDERS.

    Version 2 added typed decision fields: ``refused_by`` (the halt gate or the exposure book
    ended it before any venue saw it; ``exchange`` is then the venue it would have gone to) and
    ``error_kind`` (an exchange error ended it, or left it unknown). Version 1 updates still
    decode: those fields are derived from what version 1 wrote as strings.
    """

    KIND = "order_update"
    SCHEMA_VERSION: ClassVar[int] = 2
    ACCEPTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1, 2})
    schema_version: int = 2
    kind: Literal["order_update"] = "order_update"
    client_order_id: str
    intent_id: str
    symbol: Symbol
    side: Side
    status: OrderStatus
    quantity: Quantity
    filled_quantity: FilledQuantity
    avg_price: AveragePrice  # zero before the first fill
    exchange: str
    reason: str | None = None
    worker_id: str = ""  # the execution worker that sent (or refused) the order
    refused_by: RefusedBy | None = None
    error_kind: ErrorKind | None = None
    ts_ms: Millis

    @model_validator(mode="before")
    @classmethod
    def _upgrade_version_1(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("schema_version") != 1:
            return data
        upgraded = dict(data)
        exchange, reason = data.get("exchange"), data.get("reason")
        if exchange in set(RefusedBy):
            upgraded["refused_by"] = exchange
        elif isinstance(reason, str):
            upgraded["error_kind"] = next(
                (kind for prefix, kind in _V1_ERROR_PREFIXES if reason.startswith(prefix)), None
            )
        return upgraded

    @property
    def dedup_id(self) -> str:
        return f"order:{self.client_order_id}:{self.status.value}:{self.filled_quantity}"

    @property
    def refused_before_venue(self) -> bool:
        """Ended by our own checks (the halt gate, the exposure book): no venue saw it."""
        return self.refused_by is not None


class Fill(Message):
    """One execution against an order. ``fill_id`` is unique per exchange trade.

    Version 2 added ``fee_usdt``: a commission charged in another asset than USDT (BNB, when the
    account pays fees in BNB) is kept in its own asset (``fee``, ``fee_asset``) and valued at the
    venue's price when it was charged. ``fee_usdt`` is None when ``fee_asset`` is USDT (the fee is
    its own value) or when that price is unknown: readers then keep the fee unvalued rather than
    guess a price. Version 1 fills (no such field) still decode.
    """

    KIND = "fill"
    SCHEMA_VERSION: ClassVar[int] = 2
    ACCEPTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1, 2})
    schema_version: int = 2
    kind: Literal["fill"] = "fill"
    fill_id: str = Field(min_length=1, max_length=128)
    client_order_id: str
    symbol: Symbol
    side: Side
    quantity: Quantity
    price: Price
    fee: NonNegativeMoney
    fee_asset: Asset = SETTLEMENT_ASSET
    fee_usdt: NonNegativeMoney | None = None
    reduce_only: bool = False
    ts_ms: Millis

    @model_validator(mode="after")
    def _fee_value_only_for_other_assets(self) -> Fill:
        if self.fee_asset == SETTLEMENT_ASSET and self.fee_usdt is not None:
            raise ValueError("fee_usdt is for a fee in another asset than USDT")
        return self

    @property
    def fee_value_usdt(self) -> Decimal | None:
        """The fee in USDT: the fee itself in USDT, else its stated value (None: unknown)."""
        return self.fee if self.fee_asset == SETTLEMENT_ASSET else self.fee_usdt

    @property
    def dedup_id(self) -> str:
        return f"fill:{self.fill_id}"


# --- account entries --------------------------------------------------------------------------


class EntryCategory(enum.StrEnum):
    """How the ledger books an account entry."""

    FUNDING = "funding"  # a perpetual's funding payment, per symbol: performance
    TRANSFER = "transfer"  # capital moved in or out (or between assets): not performance
    INCOME = "income"  # any other gain or cost the venue books (rebates, bonuses, fees)


class IncomeType(enum.StrEnum):
    """Binance USD-M's documented income types (``GET /fapi/v1/income``) and how each is booked.

    REALIZED_PNL and COMMISSION of our trades come with the fills (each ``Fill`` carries its
    price and commission, and the ledger realizes the PnL itself): they are never an
    ``AccountEntry``, or they would count twice. Those of a trade that is not ours (a manual
    trade) are not booked either: the venue reconciliation alerts on the position instead.
    FUNDING_FEE is funding, per symbol. The transfers move capital: in, out, or between the
    account's assets (AUTO_EXCHANGE turns a negative balance of one asset into another).
    Everything else is other income (a gain or a cost the venue books outside a trade).
    """

    REALIZED_PNL = "REALIZED_PNL"
    COMMISSION = "COMMISSION"
    FUNDING_FEE = "FUNDING_FEE"
    TRANSFER = "TRANSFER"
    INTERNAL_TRANSFER = "INTERNAL_TRANSFER"
    CROSS_COLLATERAL_TRANSFER = "CROSS_COLLATERAL_TRANSFER"
    STRATEGY_UMFUTURES_TRANSFER = "STRATEGY_UMFUTURES_TRANSFER"
    COIN_SWAP_DEPOSIT = "COIN_SWAP_DEPOSIT"
    COIN_SWAP_WITHDRAW = "COIN_SWAP_WITHDRAW"
    AUTO_EXCHANGE = "AUTO_EXCHANGE"
    WELCOME_BONUS = "WELCOME_BONUS"
    INSURANCE_CLEAR = "INSURANCE_CLEAR"
    REFERRAL_KICKBACK = "REFERRAL_KICKBACK"
    COMMISSION_REBATE = "COMMISSION_REBATE"
    API_REBATE = "API_REBATE"
    CONTEST_REWARD = "CONTEST_REWARD"
    OPTIONS_PREMIUM_FEE = "OPTIONS_PREMIUM_FEE"
    OPTIONS_SETTLE_PROFIT = "OPTIONS_SETTLE_PROFIT"
    DELIVERED_SETTELMENT = "DELIVERED_SETTELMENT"  # sic: the venue's spelling
    POSITION_LIMIT_INCREASE_FEE = "POSITION_LIMIT_INCREASE_FEE"
    FEE_RETURN = "FEE_RETURN"
    BFUSD_REWARD = "BFUSD_REWARD"

    @property
    def carried_by_fills(self) -> bool:
        """Booked from the fills: never an account entry."""
        return self in _FROM_FILLS

    @property
    def category(self) -> EntryCategory:
        if self is IncomeType.FUNDING_FEE:
            return EntryCategory.FUNDING
        return EntryCategory.TRANSFER if self in _TRANSFERS else EntryCategory.INCOME


_FROM_FILLS = frozenset({IncomeType.REALIZED_PNL, IncomeType.COMMISSION})
_TRANSFERS = frozenset(
    {
        IncomeType.TRANSFER,
        IncomeType.INTERNAL_TRANSFER,
        IncomeType.CROSS_COLLATERAL_TRANSFER,
        IncomeType.STRATEGY_UMFUTURES_TRANSFER,
        IncomeType.COIN_SWAP_DEPOSIT,
        IncomeType.COIN_SWAP_WITHDRAW,
        IncomeType.AUTO_EXCHANGE,
    }
)


def account_entry_id(income_type: IncomeType, tran_id: str) -> str:
    """An entry's identity: the venue's ``tranId`` is unique only within one income type."""
    return f"{income_type.value}:{tran_id}"


class AccountEntry(Message):
    """An amount the venue booked to the account that is not one of our fills: funding, a
    transfer, other income (``IncomeType`` says which and how the ledger books it).

    ``amount`` is signed as the venue states it (positive flows in) and exact, in ``asset``'s
    own units: an amount in another asset than USDT is kept in that asset, never valued.
    ``entry_id`` is ``account_entry_id(income_type, tranId)``, so reading the venue's income
    again gives the same ids (the stream drops a repeat, the ledger counts one once).
    """

    KIND = "account_entry"
    kind: Literal["account_entry"] = "account_entry"
    entry_id: str = Field(min_length=1, max_length=128)
    income_type: IncomeType
    symbol: Symbol | None = None
    asset: Asset
    amount: Money
    info: str = Field(default="", max_length=256)  # the venue's note (DEPOSIT, WITHDRAW, ...)
    ts_ms: Millis

    @model_validator(mode="after")
    def _booked_here_and_nowhere_else(self) -> AccountEntry:
        if self.income_type.carried_by_fills:
            raise ValueError(f"{self.income_type.value} comes with the fills, not as an entry")
        if self.income_type is IncomeType.FUNDING_FEE and self.symbol is None:
            raise ValueError("a FUNDING_FEE entry names its symbol")
        return self

    @property
    def category(self) -> EntryCategory:
        return self.income_type.category

    @property
    def dedup_id(self) -> str:
        return f"entry:{self.entry_id}"


class VenueAccountPosition(BaseModel):
    """One position as the venue reported it at a settled read (Binance's ``positionRisk``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: Symbol
    quantity: SignedQuantity
    mark_price: Price
    unrealized_pnl: Money


class VenueAccount(Message):
    """What the venue's account held at a settled moment, for the portfolio to compare with
    its ledger (core NATS, ``subjects.VENUE_ACCOUNT``: a lost one costs one comparison).

    Execution publishes one only when the moment is settled: nothing in flight, no publish
    waiting in its outbox, the venue's income read after the account was, and two reads of
    the account around that income read equal. ``fills_through`` is the FILLS stream's last
    sequence after that income read: the ledger as of exactly that sequence must hold the
    same USDT ``wallet`` (the venue's walletBalance) and, at the venue's marks, the same
    unrealized PnL.
    """

    KIND = "venue_account"
    kind: Literal["venue_account"] = "venue_account"
    source: str = Field(min_length=1, max_length=128)
    ts_ms: Millis  # when the second account read answered
    fills_through: Count
    wallet: Money
    positions: tuple[VenueAccountPosition, ...] = Field(default=(), max_length=1024)

    @property
    def dedup_id(self) -> str:
        return f"venue-account:{self.source}:{self.ts_ms}"


# --- portfolio --------------------------------------------------------------------------------


class PositionView(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: Symbol
    quantity: SignedQuantity
    avg_entry_price: AveragePrice
    mark_price: AveragePrice  # the last close; zero before the first candle
    unrealized_pnl: Money
    realized_pnl: Money
    fees: NonNegativeMoney
    funding: Money = Decimal(0)  # USDT funding booked on the symbol (snapshot version 3)


class AssetAmount(BaseModel):
    """An amount of one asset (a fee in BNB), in that asset's own units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    asset: Asset
    amount: NonNegativeMoney


class SignedAssetAmount(BaseModel):
    """A net amount of one asset that may be negative (transfers out), in its own units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    asset: Asset
    amount: Money


class PortfolioSnapshot(Message):
    """The portfolio for display and for readers (execution's equity, the risk evaluators).

    Version 2 added ``fills_through`` (the FILLS stream sequence of the last fill applied),
    ``fees_by_asset`` (every fee in its own asset) and ``unvalued_fees`` (fees with no known
    USDT value: ``equity`` leaves them out, so it is then incomplete, not invented). Version 1
    snapshots still decode, with those empty.

    Version 3 added the account entries (``AccountEntry``): ``entries_applied``, ``funding``
    (USDT, in total and per position), ``transfers`` (net USDT moved in) and ``other_income``
    (USDT), all in ``equity``; ``transfers_by_asset`` (every transfer in its own asset) and
    ``unvalued_income`` (funding and other income in another asset than USDT: ``equity`` leaves
    it out and is incomplete). ``fills_through`` counts every FILLS message applied, entries
    included. Versions 1 and 2 still decode, with those zero or empty.
    """

    KIND = "portfolio_snapshot"
    SCHEMA_VERSION: ClassVar[int] = 3
    ACCEPTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1, 2, 3})
    schema_version: int = 3
    kind: Literal["portfolio_snapshot"] = "portfolio_snapshot"
    sequence: Count
    ts_ms: Millis
    fills_applied: Count
    initial_capital: PositiveMoney
    realized_pnl: Money
    unrealized_pnl: Money
    fees: NonNegativeMoney
    equity: Money
    peak_equity: Money
    drawdown_pct: Percent
    max_drawdown_pct: Percent
    positions: tuple[PositionView, ...]
    fills_through: Count = 0
    fees_by_asset: tuple[AssetAmount, ...] = Field(default=(), max_length=64)
    unvalued_fees: tuple[AssetAmount, ...] = Field(default=(), max_length=64)
    entries_applied: Count = 0
    funding: Money = Decimal(0)
    transfers: Money = Decimal(0)
    other_income: Money = Decimal(0)
    transfers_by_asset: tuple[SignedAssetAmount, ...] = Field(default=(), max_length=64)
    unvalued_income: tuple[SignedAssetAmount, ...] = Field(default=(), max_length=64)

    @property
    def dedup_id(self) -> str:
        return f"snapshot:{self.sequence}:{self.fills_applied}:{self.ts_ms}"

    @property
    def open_positions(self) -> int:
        return sum(1 for p in self.positions if p.quantity != 0)

    @property
    def equity_complete(self) -> bool:
        """False while a fee or an income has no USDT value: ``equity`` then leaves it out."""
        return not self.unvalued_fees and not self.unvalued_income

    @property
    def wallet(self) -> Decimal:
        """The equity without unrealized PnL: capital, realized PnL, fees, funding, transfers
        and other income (what the venue calls the wallet balance)."""
        return self.equity - self.unrealized_pnl


class CheckpointPosition(BaseModel):
    """One symbol's exact ledger state (the ledger's ``_Position``), unrounded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: Symbol
    quantity: SignedQuantity
    cost: Money  # signed cost basis of the open quantity
    realized: Money
    fees: NonNegativeMoney  # in USDT, the valued ones
    funding: Money = Decimal(0)  # in USDT (checkpoint version 2)


class CheckpointMark(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: Symbol
    price: Price


class AppliedFill(BaseModel):
    """A fill id the ledger applied and a digest of what it said (a repeat that differs is no
    repeat but a conflict)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fill_id: str = Field(min_length=1, max_length=128)
    digest: str = Field(pattern=r"^[0-9a-f]{16,64}$")


class AppliedEntry(BaseModel):
    """An account entry id the ledger applied and a digest of what it said."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entry_id: str = Field(min_length=1, max_length=128)
    digest: str = Field(pattern=r"^[0-9a-f]{16,64}$")


# How many of the latest applied fill ids a checkpoint carries, to recognise a fill stored again
# after it (a producer replaying past the stream's duplicate window); bounded so the message is.
CHECKPOINT_RECENT_FILLS = 512


class PortfolioCheckpoint(Message):
    """The portfolio's exact ledger after every message of FILLS through ``fills_through``.

    A restarted portfolio restores the newest one that decodes and replays FILLS after that
    sequence only: its start time is bounded, and FILLS' retention cannot lose a position.
    Every figure is the ledger's own (unrounded); positions and marks in the ledger's order, so
    sums add up in the same order as in the process that wrote it.

    Version 2 added the account entries' figures (see ``PortfolioSnapshot`` version 3) and the
    latest applied entry ids; a version 1 checkpoint (written before any entry) still decodes,
    with those zero or empty.
    """

    KIND = "portfolio_checkpoint"
    SCHEMA_VERSION: ClassVar[int] = 2
    ACCEPTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1, 2})
    schema_version: int = 2
    kind: Literal["portfolio_checkpoint"] = "portfolio_checkpoint"
    source: str = Field(max_length=256)
    ts_ms: Millis
    fills_through: Count
    fills_applied: Count
    initial_capital: PositiveMoney
    realized_pnl: Money
    fees_usdt: NonNegativeMoney
    fees_by_asset: tuple[AssetAmount, ...] = Field(max_length=64)
    unvalued_fees: tuple[AssetAmount, ...] = Field(max_length=64)
    peak_equity: Money
    max_drawdown_pct: Percent
    positions: tuple[CheckpointPosition, ...] = Field(max_length=1024)
    marks: tuple[CheckpointMark, ...] = Field(max_length=1024)
    recent_fills: tuple[AppliedFill, ...] = Field(max_length=CHECKPOINT_RECENT_FILLS)
    # Sequences of FILLS a person told the portfolio to pass over (``--skip-fill``): kept so
    # that every later start knows they were passed over on purpose.
    skipped: tuple[Count, ...] = Field(default=(), max_length=1024)
    entries_applied: Count = 0
    funding_usdt: Money = Decimal(0)
    transfers_usdt: Money = Decimal(0)
    other_income_usdt: Money = Decimal(0)
    transfers_by_asset: tuple[SignedAssetAmount, ...] = Field(default=(), max_length=64)
    unvalued_income: tuple[SignedAssetAmount, ...] = Field(default=(), max_length=64)
    recent_entries: tuple[AppliedEntry, ...] = Field(default=(), max_length=CHECKPOINT_RECENT_FILLS)

    @property
    def dedup_id(self) -> str:
        return f"checkpoint:{self.source}:{self.fills_through}:{self.ts_ms}"


# --- risk -------------------------------------------------------------------------------------


class RiskAlertKind(enum.StrEnum):
    DRAWDOWN = "drawdown"
    FLASH_CRASH = "flash_crash"
    STALE_MARKET_DATA = "stale_market_data"
    EXECUTION_ERROR_RATE = "execution_error_rate"
    EXCHANGE_BAN = "exchange_ban"
    # The portfolio met a fill (or an account entry) its ledger cannot apply and stopped
    # following FILLS (no stop's trigger: it halts no trading by itself, a person must look).
    LEDGER = "ledger"
    # The venue's positions differ from the ledger's (a manual trade, a fill never published),
    # and kept differing: the figures are the venue's and the ledger's quantities.
    RECONCILIATION = "reconciliation"
    # The venue's USDT wallet (or unrealized PnL) differs from the ledger's at settled reads
    # and kept differing: money moved that no fill and no income row explains. The figures are
    # the venue's and the ledger's amounts.
    WALLET_RECONCILIATION = "wallet_reconciliation"


class RiskAlert(Message):
    """A typed trip input for the EmergencyStop, with the figures behind it."""

    KIND = "risk_alert"
    kind: Literal["risk_alert"] = "risk_alert"
    alert_id: str = Field(min_length=1, max_length=128)
    alert_kind: RiskAlertKind
    source: str
    symbol: Symbol | None = None
    value: Figure
    threshold: Figure
    detail: str = Field(max_length=1024)
    ts_ms: Millis

    @property
    def dedup_id(self) -> str:
        return f"alert:{self.alert_id}"


# --- control plane ----------------------------------------------------------------------------


class TradingState(enum.StrEnum):
    """What the halt latch allows: everything, only exposure-reducing orders, or nothing."""

    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"

    @property
    def restriction(self) -> int:
        """0 ACTIVE, 1 REDUCING, 2 HALTED: the most restrictive state wins, and the metrics
        (``qtrader_trading_state``, the operator's) show this number."""
        return _RESTRICTION[self]


_RESTRICTION = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}


class HaltLatch(Message):
    """The durable halt state in the HALT KV bucket; the control message carries the same body."""

    KIND = "halt_latch"
    kind: Literal["halt_latch"] = "halt_latch"
    state: TradingState
    revision: Count
    reason: str = Field(default="", max_length=1024)
    issued_by: str = Field(default="", max_length=256)
    issued_at_ms: Millis
    # The trip that wrote this revision asks execution to close every position (the
    # EmergencyStop's flattenOnTrip); the halt gate lets exactly those orders through.
    flatten: bool = False
    # The EmergencyStops that hold this halt (every one not Armed), sorted; empty when ACTIVE.
    # Absent in latches written before it existed, which then read as held by nobody named.
    held_by: tuple[str, ...] = Field(default=(), max_length=256)

    @property
    def dedup_id(self) -> str:
        return f"halt:{self.revision}"


class HaltAck(Message):
    """A worker's confirmation that it obeys latch ``revision`` (sent on CONTROL_HALT_ACK)."""

    KIND = "halt_ack"
    kind: Literal["halt_ack"] = "halt_ack"
    worker_id: str
    revision: Count
    state: TradingState
    open_orders_cancelled: Count = 0
    ts_ms: Millis

    @property
    def dedup_id(self) -> str:
        return f"halt-ack:{self.worker_id}:{self.revision}"


class ControlHeartbeat(Message):
    """The control plane says it is alive (sent on CONTROL_HEARTBEAT every second or so).

    An execution worker that hears none for longer than its timeout halts itself: a control
    plane that cannot reach it could not halt it either.
    """

    KIND = "control_heartbeat"
    kind: Literal["control_heartbeat"] = "control_heartbeat"
    issued_by: str
    latch_revision: Count
    ts_ms: Millis

    @property
    def dedup_id(self) -> str:
        return f"heartbeat:{self.issued_by}:{self.ts_ms}"


# The EmergencyStop's states as ``qtrader.control.ess_status.EssState`` names them (that module
# sits above the contracts; a unit test keeps the two the same).
EssStateName = Literal["Armed", "Tripped", "Reducing", "CoolingDown"]


class EmergencyStopView(Message):
    """One EmergencyStop as its control plane last decided it (sent on CONTROL_ESS_STATUS after
    every reconcile round): what a live viewer needs beyond the latch. The latch says what
    workers obey; this says who tripped which stop, why, since when, until when its cooldown
    runs and whether a reset must then be asked for, and which workers have not acknowledged.
    Informational: nothing trades or halts on it."""

    KIND = "emergency_stop_view"
    kind: Literal["emergency_stop_view"] = "emergency_stop_view"
    name: str = Field(min_length=1, max_length=253)
    state: EssStateName
    latch: TradingState  # this stop's own latch; the one in force combines every stop
    latch_revision: Count
    reason: str = Field(default="", max_length=1024)
    tripped_by: str = Field(default="", max_length=256)
    tripped_at_ms: Millis | None = None  # the last trip, kept after a reset for the post-mortem
    cooldown_until_ms: Millis | None = None  # None while Armed
    require_manual_reset: bool
    automatic: bool = False  # tripped by a risk alert (tripped_by "risk:...")
    trip_count: Count = 0
    reset_count: Count = 0
    pending_workers: tuple[str, ...] = Field(default=(), max_length=256)
    held_by: tuple[str, ...] = Field(default=(), max_length=256)
    ts_ms: Millis

    @property
    def dedup_id(self) -> str:
        return f"ess-view:{self.name}:{self.ts_ms}"


class HealthStatus(enum.StrEnum):
    """A workload's or a dependency's health, as ``/health`` and the health reports say it."""

    OK = "OK"
    DEGRADED = "DEGRADED"
    CRITICAL = "CRITICAL"

    @property
    def severity(self) -> int:
        """0 OK, 1 DEGRADED, 2 CRITICAL: the worst wins; the health gauges show this number."""
        return _SEVERITY[self]


_SEVERITY = {HealthStatus.OK: 0, HealthStatus.DEGRADED: 1, HealthStatus.CRITICAL: 2}


class DependencyState(BaseModel):
    """One dependency of a health report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    status: HealthStatus
    detail: str = Field(default="", max_length=1024)
    latency_ms: float | None = Field(default=None, ge=0, le=3_600_000, allow_inf_nan=False)


class WorkloadHealthReport(Message):
    """A worker's ``/health``, sent on ``health_report_subject(service)`` at every refresh.

    So one place (the portfolio's live viewers) can show every workload's health in a cluster
    too, where it cannot reach the others' ports. ``interval_s``: the next report is due within
    it, so a reader can tell a silent worker from a quiet one."""

    KIND = "workload_health"
    kind: Literal["workload_health"] = "workload_health"
    service: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    worker_id: str = Field(min_length=1, max_length=256)
    status: HealthStatus
    version: str = Field(max_length=64)
    uptime_s: float = Field(ge=0, le=1e10, allow_inf_nan=False)
    interval_s: float = Field(gt=0, le=3600, allow_inf_nan=False)
    dependencies: tuple[DependencyState, ...] = Field(default=(), max_length=64)
    ts_ms: Millis

    @property
    def dedup_id(self) -> str:
        return f"health:{self.worker_id}:{self.ts_ms}"


class PolicyRevision(Message):
    """One published TradingPolicy revision, as the workloads read it from the POLICY bucket."""

    KIND = "policy_revision"
    kind: Literal["policy_revision"] = "policy_revision"
    name: str
    revision: int = Field(ge=1, le=2**63 - 1)
    published_at_ms: Millis
    spec: TradingPolicySpec

    @property
    def dedup_id(self) -> str:
        return f"policy:{self.name}:{self.revision}"
