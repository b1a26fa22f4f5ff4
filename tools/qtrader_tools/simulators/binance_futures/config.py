"""The simulator's settings: limits, window mode, bans, fees, account, checks.

One frozen value, built from JSON (the CLI's ``--config`` file and ``POST /_sim/config``). Every
field is validated up front with a message naming the field, so a typo in a stress scenario fails
at start-up rather than producing an unlimited or silently different exchange.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from qtrader.exchange.limits import LimitKind, RateLimitRule

DEFAULT_RULES = (
    RateLimitRule(LimitKind.REQUEST_WEIGHT, "MINUTE", 1, 2400),
    RateLimitRule(LimitKind.ORDERS, "MINUTE", 1, 1200),
    RateLimitRule(LimitKind.ORDERS, "SECOND", 10, 300),
)
MAX_BAN_S = 3 * 86_400  # Binance: bans last "from 2 minutes to 3 days"


class ConfigError(ValueError):
    """A simulator setting that is missing, of the wrong type or out of range."""


class WindowMode(enum.StrEnum):
    FIXED = "fixed"  # windows aligned to epoch multiples of their length, like Binance's
    SLIDING = "sliding"  # the trailing window ending now


BNB_SYMBOL = "BNBUSDT"


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Fields (JSON names are the same; decimals may be strings or numbers):

    ``api_keys`` {key: secret}; ``rate_limits`` exchangeInfo ``rateLimits`` entries (also what
    exchangeInfo then lists); ``window_mode`` "fixed" or "sliding"; ``ban_base_s``/``ban_cap_s``
    the first ban and the longest; ``taker_fee``/``maker_fee`` commission rates; ``balance`` the
    USDT wallet of every key; ``leverage`` for the margin check; ``check_signature``;
    ``recv_window_ms`` when a request sends none; ``client_ip_header`` honour X-Sim-Client-IP;
    ``prices`` start prices per symbol, else ``default_price``; ``countdown_check_ms``;
    ``start_skew_ms`` the server clock's skew at start and after a reset (negative: the market,
    and its klines, began that long before the wall clock's now).

    Streams and account: ``kline_push_ms`` how often forming klines are pushed (Binance: 250)
    and how often the housekeeping (kline closes, funding, listenKey expiry, connection age)
    runs; ``ws_max_age_ms`` when the server closes a websocket (Binance: 24 h);
    ``listen_key_validity_ms`` (60 min); ``funding_interval_ms`` (8 h, aligned to the epoch:
    00:00, 08:00, 16:00 UTC); ``funding_rates`` per symbol (absent: 0); ``bnb_balance`` the BNB
    wallet of every key at start; ``bnb_price`` in USDT; ``fee_burn`` keys paying fees in BNB.
    """

    api_keys: Mapping[str, str] = field(default_factory=lambda: {"sim-key": "sim-secret"})
    rate_limits: tuple[RateLimitRule, ...] = DEFAULT_RULES
    window_mode: WindowMode = WindowMode.FIXED
    ban_base_s: float = 120.0
    ban_cap_s: float = MAX_BAN_S
    taker_fee: Decimal = Decimal("0.0004")
    maker_fee: Decimal = Decimal("0.0002")
    balance: Decimal = Decimal("10000")
    leverage: int = 20
    check_signature: bool = True
    recv_window_ms: int = 5000  # applies when a request carries no recvWindow
    client_ip_header: bool = False  # honour X-Sim-Client-IP (tests emulating two egress IPs)
    prices: Mapping[str, Decimal] = field(default_factory=dict)
    default_price: Decimal = Decimal(100)
    countdown_check_ms: int = 10
    kline_push_ms: int = 250
    ws_max_age_ms: int = 86_400_000
    listen_key_validity_ms: int = 3_600_000
    funding_interval_ms: int = 28_800_000
    funding_rates: Mapping[str, Decimal] = field(default_factory=dict)
    bnb_balance: Decimal = Decimal(0)
    bnb_price: Decimal = Decimal(600)
    fee_burn: tuple[str, ...] = ()
    start_skew_ms: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.api_keys), "api_keys must name at least one key")
        kinds = {rule.kind for rule in self.rate_limits}
        _check(kinds == set(LimitKind), "rate_limits needs a REQUEST_WEIGHT and an ORDERS rule")
        keys = [rule.key for rule in self.rate_limits]
        _check(len(keys) == len(set(keys)), f"rate_limits has two rules for one window: {keys}")
        _check(0 < self.ban_base_s <= self.ban_cap_s, "need 0 < ban_base_s <= ban_cap_s")
        _check(self.ban_cap_s <= MAX_BAN_S, f"ban_cap_s must be at most {MAX_BAN_S}")
        _check(Decimal(0) <= self.taker_fee < 1, "taker_fee must be in [0, 1)")
        _check(Decimal(0) <= self.maker_fee < 1, "maker_fee must be in [0, 1)")
        _check(self.balance >= 0, "balance must not be negative")
        _check(1 <= self.leverage <= 125, "leverage must be in [1, 125]")
        _check(0 < self.recv_window_ms <= 60_000, "recv_window_ms must be in (0, 60000]")
        _check(self.default_price > 0, "default_price must be positive")
        _check(all(p > 0 for p in self.prices.values()), "prices must be positive")
        _check(1 <= self.countdown_check_ms <= 1000, "countdown_check_ms must be in [1, 1000]")
        _check(1 <= self.kline_push_ms <= 60_000, "kline_push_ms must be in [1, 60000]")
        _check(self.ws_max_age_ms >= 1, "ws_max_age_ms must be positive")
        _check(self.listen_key_validity_ms >= 1, "listen_key_validity_ms must be positive")
        _check(self.funding_interval_ms >= 1000, "funding_interval_ms must be at least 1000")
        _check(self.bnb_balance >= 0, "bnb_balance must not be negative")
        _check(self.bnb_price > 0, "bnb_price must be positive")
        _check(all(-1 < r < 1 for r in self.funding_rates.values()), "funding_rates in (-1, 1)")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SimConfig:
        """Build from JSON; unknown fields are an error, absent ones take their defaults."""
        return cls().merged(raw)

    def merged(self, raw: Mapping[str, Any]) -> SimConfig:
        """This config with the fields present in ``raw`` replaced (``POST /_sim/config``)."""
        if not isinstance(raw, Mapping):
            raise ConfigError("config must be a JSON object")
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(names)}")
        changes = {name: _PARSERS[name](name, value) for name, value in raw.items()}
        try:
            return dataclasses.replace(self, **changes)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None

    def as_dict(self) -> dict[str, Any]:
        return {
            "api_keys": dict(self.api_keys),
            "rate_limits": [rule.as_binance() for rule in self.rate_limits],
            "window_mode": self.window_mode.value,
            "ban_base_s": self.ban_base_s,
            "ban_cap_s": self.ban_cap_s,
            "taker_fee": str(self.taker_fee),
            "maker_fee": str(self.maker_fee),
            "balance": str(self.balance),
            "leverage": self.leverage,
            "check_signature": self.check_signature,
            "recv_window_ms": self.recv_window_ms,
            "client_ip_header": self.client_ip_header,
            "prices": {symbol: str(price) for symbol, price in self.prices.items()},
            "default_price": str(self.default_price),
            "countdown_check_ms": self.countdown_check_ms,
            "kline_push_ms": self.kline_push_ms,
            "ws_max_age_ms": self.ws_max_age_ms,
            "listen_key_validity_ms": self.listen_key_validity_ms,
            "funding_interval_ms": self.funding_interval_ms,
            "funding_rates": {s: str(r) for s, r in self.funding_rates.items()},
            "bnb_balance": str(self.bnb_balance),
            "bnb_price": str(self.bnb_price),
            "fee_burn": list(self.fee_burn),
            "start_skew_ms": self.start_skew_ms,
        }

    def price_for(self, symbol: str) -> Decimal:
        """The start price; BNBUSDT's is ``bnb_price``, so BNB has one price on this venue: the
        one its ticker quotes and its BNB commissions are converted at."""
        fallback = self.bnb_price if symbol == BNB_SYMBOL else self.default_price
        return self.prices.get(symbol, fallback)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _api_keys(name: str, value: Any) -> dict[str, str]:
    _check(isinstance(value, Mapping), f"{name} must be an object of api_key: secret")
    pairs = dict(value)
    _check(
        all(isinstance(k, str) and k and isinstance(s, str) and s for k, s in pairs.items()),
        f"{name}: keys and secrets must be non-empty strings",
    )
    return pairs


def _rules(name: str, value: Any) -> tuple[RateLimitRule, ...]:
    _check(isinstance(value, list), f"{name} must be a list of exchangeInfo rateLimits entries")
    rules = []
    for raw in value:
        _check(isinstance(raw, Mapping), f"{name}: each entry must be an object")
        try:
            rules.append(
                RateLimitRule(
                    kind=LimitKind(raw["rateLimitType"]),
                    interval=str(raw["interval"]),
                    interval_num=_integer(f"{name}.intervalNum", raw["intervalNum"]),
                    limit=_integer(f"{name}.limit", raw["limit"]),
                )
            )
        except KeyError as exc:
            raise ConfigError(f"{name}: entry {dict(raw)} lacks {exc.args[0]}") from None
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return tuple(rules)


def _integer(name: str, value: Any) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer")
    return int(value)


def _number(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    _check(ok, f"{name} must be a number")
    return float(value)


def _decimal(name: str, value: Any) -> Decimal:
    ok = isinstance(value, str | int | float) and not isinstance(value, bool)
    _check(ok, f"{name} must be a decimal string or number")
    try:
        parsed = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{name} must be a decimal, got {value!r}") from None
    _check(parsed.is_finite(), f"{name} must be finite")
    return parsed


def _boolean(name: str, value: Any) -> bool:
    _check(isinstance(value, bool), f"{name} must be true or false")
    return bool(value)


def _window_mode(name: str, value: Any) -> WindowMode:
    modes = [m.value for m in WindowMode]
    _check(value in modes, f"{name} must be one of {modes}")
    return WindowMode(value)


def _keys(name: str, value: Any) -> tuple[str, ...]:
    ok = isinstance(value, list) and all(isinstance(k, str) and k for k in value)
    _check(ok, f"{name} must be a list of api keys")
    return tuple(value)


def _prices(name: str, value: Any) -> dict[str, Decimal]:
    _check(isinstance(value, Mapping), f"{name} must be an object of symbol: price")
    return {str(symbol): _decimal(f"{name}.{symbol}", price) for symbol, price in value.items()}


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "api_keys": _api_keys,
    "rate_limits": _rules,
    "window_mode": _window_mode,
    "ban_base_s": _number,
    "ban_cap_s": _number,
    "taker_fee": _decimal,
    "maker_fee": _decimal,
    "balance": _decimal,
    "leverage": _integer,
    "check_signature": _boolean,
    "recv_window_ms": _integer,
    "client_ip_header": _boolean,
    "prices": _prices,
    "default_price": _decimal,
    "countdown_check_ms": _integer,
    "kline_push_ms": _integer,
    "ws_max_age_ms": _integer,
    "listen_key_validity_ms": _integer,
    "funding_interval_ms": _integer,
    "funding_rates": _prices,
    "bnb_balance": _decimal,
    "bnb_price": _decimal,
    "fee_burn": _keys,
    "start_skew_ms": _integer,
}
