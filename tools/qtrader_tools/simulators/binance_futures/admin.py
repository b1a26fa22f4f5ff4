"""A small synchronous client for the simulator's admin API (``/_sim/``), over httpx.

For tests and benchmarks that run the simulator in another process (``python -m
qtrader_tools.simulators.binance_futures``) or another thread. Each method is one admin call; a
refused call raises ``SimAdminError`` with the server's reason.
"""

from __future__ import annotations

from decimal import Decimal
from types import TracebackType
from typing import Any

import httpx


class SimAdminError(RuntimeError):
    """The simulator refused an admin call (bad input) or answered unexpectedly."""


class SimAdmin:
    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SimAdmin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def reset(self) -> None:
        """Back to the start-up config and its clock skew: no orders, trades, log, faults, bans."""
        self._call("POST", "/_sim/reset")

    def get_config(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_sim/config")
        return result

    def config(self, **changes: Any) -> dict[str, Any]:
        """Change settings (see ``SimConfig``); returns the whole config after the change."""
        result: dict[str, Any] = self._call("POST", "/_sim/config", changes)
        return result

    def faults(self, faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace the fault list (see ``faults``); ``[]`` clears it."""
        result: list[dict[str, Any]] = self._call("POST", "/_sim/faults", faults)
        return result

    def get_faults(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/_sim/faults")
        return result

    def price(self, symbol: str, price: Decimal | str | float) -> dict[str, Any]:
        """Set a symbol's price; returns the resting orders it filled under ``filled``."""
        result: dict[str, Any] = self._call(
            "POST", "/_sim/price", {"symbol": symbol, "price": str(price)}
        )
        return result

    def partial(self, symbol: str, ratio: Decimal | str | float, count: int) -> None:
        """The next ``count`` taker orders on ``symbol`` fill only ``ratio`` of their quantity."""
        self._call("POST", "/_sim/partial", {"symbol": symbol, "ratio": str(ratio), "count": count})

    def clock(self, *, skew_ms: int | None = None, advance_ms: int | None = None) -> int:
        """Set (``skew_ms``) or shift (``advance_ms``) the server clock; returns the skew."""
        if (skew_ms is None) == (advance_ms is None):
            raise ValueError("pass exactly one of skew_ms or advance_ms")
        body = {"skew_ms": skew_ms} if skew_ms is not None else {"advance_ms": advance_ms}
        return int(self._call("POST", "/_sim/clock", body)["skew_ms"])

    def report_time_offset(self, offset_ms: int) -> int:
        """Report the server time ``offset_ms`` away from the clock that checks timestamps
        (0 restores agreement): a client's resync then cannot cure its -1021s."""
        return int(self._call("POST", "/_sim/clock/report", {"offset_ms": offset_ms})["offset_ms"])

    def log(self, since: int = 0) -> list[dict[str, Any]]:
        """Every exchange request from index ``since`` on, in arrival order."""
        result: list[dict[str, Any]] = self._call("GET", f"/_sim/log?since={since}")
        return result

    def orders(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/_sim/orders")
        return result

    def trades(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/_sim/trades")
        return result

    def countdowns(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/_sim/countdowns")
        return result

    def windows(self) -> dict[str, Any]:
        """The rate-limit audit: per rule and subject, the most admitted in one window."""
        result: dict[str, Any] = self._call("GET", "/_sim/windows")
        return result

    def funding_rate(self, symbol: str, rate: Decimal | str) -> None:
        """Set a symbol's funding rate (charged at every funding time from now on)."""
        self._call("POST", "/_sim/funding/rate", {"symbol": symbol, "rate": str(rate)})

    def settle_funding(self, symbol: str | None = None) -> list[dict[str, Any]]:
        """Charge funding now (every symbol, or one); returns the FUNDING_FEE entries."""
        body = {} if symbol is None else {"symbol": symbol}
        result: list[dict[str, Any]] = self._call("POST", "/_sim/funding/settle", body)
        return result

    def transfer(
        self, api_key: str, asset: str, amount: Decimal | str, *, income_delay_ms: int = 0
    ) -> dict[str, Any]:
        """Deposit (amount > 0) or withdraw USDT or BNB; returns the TRANSFER entry, which the
        income history shows ``income_delay_ms`` later (a lagging venue; far off: never)."""
        body: dict[str, Any] = {"api_key": api_key, "asset": asset, "amount": str(amount)}
        if income_delay_ms:
            body["income_delay_ms"] = income_delay_ms
        result: dict[str, Any] = self._call("POST", "/_sim/transfer", body)
        return result

    def fee_burn(self, api_key: str, enabled: bool) -> None:
        """Pay this account's commissions in BNB at a 10% discount (Binance's BNB burn)."""
        self._call("POST", "/_sim/fee_burn", {"api_key": api_key, "enabled": enabled})

    def manual_trade(
        self, api_key: str, symbol: str, side: str, quantity: Decimal | str
    ) -> dict[str, Any]:
        """A MARKET order placed outside the API (e.g. the web UI); returns the order."""
        body = {"api_key": api_key, "symbol": symbol, "side": side, "quantity": str(quantity)}
        result: dict[str, Any] = self._call("POST", "/_sim/manual_trade", body)
        return result

    def income(self) -> list[dict[str, Any]]:
        """Every ledger entry of every account, with ``apiKey``."""
        result: list[dict[str, Any]] = self._call("GET", "/_sim/income")
        return result

    def websockets(self) -> dict[str, Any]:
        """Open websocket connections and active listen keys."""
        result: dict[str, Any] = self._call("GET", "/_sim/ws")
        return result

    def drop_websockets(self, *, refuse: bool | None = None) -> int:
        """Abort every websocket connection now (a network failure); returns how many.
        ``refuse``: True refuses new connections from now on (an outage), False ends that."""
        body = {} if refuse is None else {"refuse": refuse}
        return int(self._call("POST", "/_sim/ws/drop", body)["dropped"])

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise SimAdminError(f"{method} {self.base_url}{path}: {exc}") from exc
        if response.status_code != 200:
            try:
                reason = response.json().get("error", response.text)
            except ValueError:
                reason = response.text
            raise SimAdminError(f"{method} {path} -> {response.status_code}: {reason}")
        return response.json()
