"""The argument types of ``qtrader``'s commands: each refuses a bad value saying what is wrong,
so argparse exits 2 before anything starts."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TypeAlias

from qtrader.contracts import subjects

# What ``add_subparsers`` returns; each command module adds its commands to it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def number(kind: str, *, minimum: float, inclusive: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (not inclusive and value == minimum):
            bound = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"{kind} must be {bound} {minimum:g}, got {text}")
        return value

    return parse


def integer(*, minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


port = integer(minimum=1, maximum=65535)
whole = integer(minimum=0)


def positive_decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def volume_share(text: str) -> Decimal:
    value = positive_decimal(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1 (a candle's whole volume), got {text}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def nats_url(text: str) -> str:
    if not text.startswith(("nats://", "tls://", "ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"NATS URL must start with nats:// or tls://, got {text}")
    return text


def stack_id(text: str) -> str | None:
    if not text:
        return None
    try:
        return subjects.check_stack(text)
    except subjects.InvalidStack as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def http_url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text.rstrip("/")


def redis_url(text: str) -> str:
    if not re.fullmatch(r"rediss?://\S+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a redis:// URL")
    return text


def resource_name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text) or len(text) > 63:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a resource name (lowercase letters, digits and '-', at most 63)"
        )
    return text


def reason(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a reason is required when tripping")
    if len(text) > 1024:
        raise argparse.ArgumentTypeError(f"at most 1024 characters, got {len(text)}")
    return text


def symbol(text: str) -> str:
    if not re.fullmatch(r"[A-Z0-9]{2,20}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a symbol (like BTCUSDT)")
    return text


def short_seconds(flag: str) -> Callable[[str], float]:
    """A finite number of seconds in (0, 600]."""
    positive = number(flag, minimum=0, inclusive=False)

    def parse(text: str) -> float:
        value = positive(text)
        if value > 600:  # also infinity
            raise argparse.ArgumentTypeError(f"{flag} must be <= 600, got {text}")
        if not value <= 600:  # NaN compares false to everything, so passed the checks above
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        return value

    return parse


def json_output(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {path.parent}")
    return path
