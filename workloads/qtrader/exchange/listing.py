"""What a venue lists: its exchangeInfo, fetched, so a policy's symbols are checked against the
venue it trades on (the paper listing says nothing of Binance's).

``VenueListings`` is the mapping ``load_policy_file`` and the operator check symbols with: the
paper exchange's listing at once, a testnet or live venue's fetched when first asked for (a
public request of weight 1). A venue that cannot be asked is ``ListingUnavailable``: the
symbols are then not known to be tradable, so the policy is refused (fail closed), with why.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import httpx

from qtrader.contracts.policy import PolicyError, TradingMode
from qtrader.instruments import ExchangeInfo, InstrumentError, paper_exchange_info

BASE_URLS = {
    TradingMode.TESTNET: "https://testnet.binancefuture.com",
    TradingMode.LIVE: "https://fapi.binance.com",
}
EXCHANGE_INFO_PATH = "/fapi/v1/exchangeInfo"


class ListingUnavailable(PolicyError):
    """The venue's listing could not be read: its symbols cannot be checked."""


def fetch_listing(
    mode: TradingMode, base_url: str | None = None, *, timeout_s: float = 10.0
) -> ExchangeInfo:
    """The instruments ``mode``'s venue trades now (``base_url`` overrides its address)."""
    url = (base_url or BASE_URLS[mode]).rstrip("/") + EXCHANGE_INFO_PATH
    try:
        response = httpx.get(url, timeout=timeout_s)
        response.raise_for_status()
        return ExchangeInfo.from_binance(response.json())
    except (httpx.HTTPError, ValueError, InstrumentError) as exc:
        raise ListingUnavailable(
            f"cannot check spec.symbols against the {mode.value} exchange ({url}): {exc!r}"
        ) from exc


class VenueListings(Mapping[TradingMode, ExchangeInfo]):
    """Paper's listing, and each Binance venue's fetched on first use (then kept)."""

    def __init__(self, base_url: str | None = None) -> None:
        self._base_url = base_url
        self._known: dict[TradingMode, ExchangeInfo] = {TradingMode.PAPER: paper_exchange_info()}

    def __getitem__(self, mode: TradingMode) -> ExchangeInfo:
        if mode not in self._known:
            self._known[mode] = fetch_listing(mode, self._base_url)
        return self._known[mode]

    def __iter__(self) -> Iterator[TradingMode]:
        return iter(TradingMode)

    def __len__(self) -> int:
        return len(TradingMode)
