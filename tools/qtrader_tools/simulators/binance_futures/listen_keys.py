"""User-data stream listen keys (``/fapi/v1/listenKey``), on the server clock.

Binance's rules: a key is valid for 60 minutes after creation; PUT extends it by 60 minutes
(an unknown or expired key: -1125 "This listenKey does not exist."); DELETE invalidates it;
POST on an account with an active key returns that key and extends it. One active key per
account. Keys are 64 characters, derived from the API key and a counter, so a run is
reproducible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from . import errors

NO_SUCH_KEY = (-1125, "This listenKey does not exist.")


@dataclass
class ListenKey:
    key: str
    api_key: str
    expires_ms: int


@dataclass
class ListenKeys:
    validity_ms: int
    _by_key: dict[str, ListenKey] = field(default_factory=dict)
    _by_account: dict[str, str] = field(default_factory=dict)
    _issued: int = 0

    def open(self, api_key: str, now_ms: int) -> str:
        active = self._by_account.get(api_key)
        if active is not None and active in self._by_key:
            self._by_key[active].expires_ms = now_ms + self.validity_ms
            return active
        self._issued += 1
        key = hashlib.sha256(f"{api_key}:{self._issued}".encode()).hexdigest()
        self._by_key[key] = ListenKey(key, api_key, now_ms + self.validity_ms)
        self._by_account[api_key] = key
        return key

    def keepalive(self, api_key: str, key: str | None, now_ms: int) -> str:
        found = self._active(api_key, key)
        found.expires_ms = now_ms + self.validity_ms
        return found.key

    def close(self, api_key: str, key: str | None) -> str:
        found = self._active(api_key, key)
        self._forget(found)
        return found.key

    def account_of(self, key: str) -> str | None:
        found = self._by_key.get(key)
        return found.api_key if found is not None else None

    def expire(self, now_ms: int) -> list[ListenKey]:
        """Forget and return every key whose validity ran out by ``now_ms``."""
        gone = [k for k in self._by_key.values() if k.expires_ms <= now_ms]
        for key in gone:
            self._forget(key)
        return gone

    def active(self) -> list[ListenKey]:
        return list(self._by_key.values())

    def _active(self, api_key: str, key: str | None) -> ListenKey:
        current = self._by_account.get(api_key)
        if current is None or (key and key != current) or current not in self._by_key:
            raise errors.rejected(NO_SUCH_KEY)
        return self._by_key[current]

    def _forget(self, key: ListenKey) -> None:
        self._by_key.pop(key.key, None)
        if self._by_account.get(key.api_key) == key.key:
            del self._by_account[key.api_key]
