"""The leak guard of tests/integration/conftest.py finds what a test left to the collector.

Each test leaks on purpose inside a reference cycle (so only the collector frees it) and calls
``collect_leaks`` itself, which consumes the leak: the guard's own check after the test then
finds nothing, and the test passes only if ``collect_leaks`` reported it.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from support.leaks import collect_leaks

pytestmark = pytest.mark.integration


class _Cycle:
    """Holds ``payload`` in a reference cycle: freed by the collector, never by refcounting."""

    def __init__(self, payload: object) -> None:
        self.payload = payload
        self.me = self


class _BrokenFinaliser:
    def __del__(self) -> None:
        raise RuntimeError("finaliser failed")


def test_collect_leaks_when_nothing_leaked_then_reports_nothing() -> None:
    assert collect_leaks() == []


def test_collect_leaks_when_a_socket_is_left_open_then_names_it() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    _Cycle(sock)
    del sock
    leaks = collect_leaks()
    assert len(leaks) == 1, leaks
    assert "ResourceWarning: unclosed <socket.socket" in leaks[0]
    assert f"'127.0.0.1', {port}" in leaks[0]


def test_collect_leaks_when_a_finaliser_raises_then_reports_it_instead_of_a_later_test() -> None:
    _Cycle(_BrokenFinaliser())
    leaks = collect_leaks()
    assert len(leaks) == 1, leaks
    assert "RuntimeError: finaliser failed" in leaks[0]


def test_a_synchronous_test_has_an_open_event_loop_of_its_own() -> None:
    # python-binance's Client() takes asyncio.get_event_loop(): it must get a loop the guard
    # closes after the test, not create one nobody closes.
    loop = asyncio.get_event_loop_policy().get_event_loop()
    assert not loop.is_closed()
    assert not loop.is_running()
