"""Binance API keys: from a mounted Kubernetes Secret (files) or the environment, never printed.

In a cluster the chart mounts the Secret as files (``api-key``, ``api-secret``) in the directory
named by ``QTRADER_BINANCE_SECRET_DIR``; locally ``QTRADER_BINANCE_API_KEY`` and
``QTRADER_BINANCE_API_SECRET`` work too. The keys' ``repr`` is masked, so a log line or a traceback
that prints the settings cannot leak them; the rate limiter keys orders by a hash of the API key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qtrader.exchange.limiter import account_id_for

SECRET_DIR_VARIABLE = "QTRADER_BINANCE_SECRET_DIR"
KEY_VARIABLE = "QTRADER_BINANCE_API_KEY"
SECRET_VARIABLE = "QTRADER_BINANCE_API_SECRET"
KEY_FILE = "api-key"
SECRET_FILE = "api-secret"


class CredentialsError(ValueError):
    """No usable API key: the message says where keys are looked for."""


@dataclass(frozen=True)
class Credentials:
    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(account={self.account_id})"

    @property
    def account_id(self) -> str:
        """A stable, non-secret name for the account: the limiter's ORDERS budget key."""
        return account_id_for(self.api_key)


def load_credentials(environ: Mapping[str, str]) -> Credentials:
    secret_dir = environ.get(SECRET_DIR_VARIABLE)
    if secret_dir:
        directory = Path(secret_dir)
        return _checked(_read(directory / KEY_FILE), _read(directory / SECRET_FILE))
    key, secret = environ.get(KEY_VARIABLE, ""), environ.get(SECRET_VARIABLE, "")
    if not key or not secret:
        raise CredentialsError(
            f"no Binance API key: set {SECRET_DIR_VARIABLE} to a directory holding "
            f"{KEY_FILE} and {SECRET_FILE} (a mounted Secret), or set {KEY_VARIABLE} and "
            f"{SECRET_VARIABLE}"
        )
    return _checked(key, secret)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None


def _checked(key: str, secret: str) -> Credentials:
    if not key or not secret:
        raise CredentialsError("the Binance API key or secret is empty")
    if any(c.isspace() for c in key + secret):
        raise CredentialsError("the Binance API key or secret contains whitespace")
    return Credentials(api_key=key, api_secret=secret)
