"""python-binance's asyncio client and socket manager, pointed at the right venue.

The live kline feed uses
``AsyncClient`` and ``BinanceSocketManager``. Binance itself is chosen by ``testnet`` (the
library knows both hosts); any other venue with Binance's API (the local simulator) is named by
its REST base URL, and its streams are taken to be served on the same host (``stream_base_of``).

Things about python-binance (1.0.37) that matter here: ``AsyncClient.create()`` pings Spot
REST at once (``/api/v3/ping``), so the class's ``API_URL`` and ``FUTURES_URL`` must already
point at the venue; ``BinanceSocketManager.__init__`` copies the class's ``FSTREAM_URL``, so
the instance's is set after it.
"""

from __future__ import annotations

import warnings
from typing import Any

with warnings.catch_warnings():
    # python-binance 1.0.37 imports websockets' legacy client, which websockets >= 14 deprecates
    # at import time; not ours to fix, and the test suite turns warnings into errors.
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance import AsyncClient, BinanceSocketManager

from qtrader.exchange.credentials import Credentials
from qtrader.exchange.user_stream import stream_base_of


async def create_client(
    *, rest_url: str | None, testnet: bool, credentials: Credentials | None = None
) -> Any:
    """``AsyncClient`` on Binance (by ``testnet``) or on the venue at ``rest_url``."""
    key = credentials.api_key if credentials else None
    secret = credentials.api_secret if credentials else None
    if rest_url is None:
        return await AsyncClient.create(key, secret, testnet=testnet)
    base = rest_url.rstrip("/")

    class VenueClient(AsyncClient):  # type: ignore[misc]  # create() reads class attributes
        API_URL = f"{base}/api"
        FUTURES_URL = f"{base}/fapi"

    return await VenueClient.create(key, secret)


def socket_manager(
    client: Any, *, rest_url: str | None, stream_url: str | None = None, **options: Any
) -> Any:
    """``BinanceSocketManager`` whose USD-M futures streams come from the same venue as the
    client's REST: ``stream_url`` when given, else ``rest_url``'s host; Binance's otherwise."""
    manager = BinanceSocketManager(client, **options)
    base = stream_url or (stream_base_of(rest_url) if rest_url else None)
    if base is not None:
        manager.FSTREAM_URL = base
    return manager
