"""A leak guard for every integration test: what a test leaves unclosed fails that test.

Integration tests open real sockets, NATS connections, HTTP clients and event loops. One left
unclosed in a reference cycle is freed by the garbage collector at some later moment, and with
``filterwarnings = ["error"]`` its ResourceWarning then fails an unrelated test (often a
hypothesis test in tests/unit). So after each test, and after each module's module-scoped
fixtures, the guard runs the collector itself and fails the test that leaked, with what leaked
(and where it was allocated, under ``PYTHONTRACEMALLOC=20``).

A synchronous test also gets an event loop of its own, set as the thread's current loop and
closed after it: python-binance's ``Client()`` calls ``asyncio.get_event_loop()``, which outside
a running loop creates one and leaves it to nobody; the next async test replaced it and the
collector later reported "unclosed event loop" against some other test.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from support.emulator import Cluster, serve
from support.leaks import collect_leaks


@pytest.fixture
async def cluster(kmock: Any) -> AsyncIterator[Cluster]:
    """kmock's Kubernetes emulator serving the operator's resources, and kubectl for it."""
    serve(kmock)
    client = Cluster(kmock)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(autouse=True, scope="module")
def no_leak_from_module_fixtures() -> Iterator[None]:
    """Torn down after the module's other module-scoped fixtures (a whole ``qtrader up``)."""
    yield
    _fail_on(collect_leaks(), "the module-scoped fixtures of this module")


@pytest.fixture(autouse=True)
def no_leak_from_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Set up before the test's event loop, so its teardown runs once that loop is closed."""
    own_loop = None if pytest_asyncio.is_async_test(request.node) else _set_new_loop()
    yield
    problems = [] if own_loop is None else _release(own_loop)
    _fail_on(problems + collect_leaks(), "this test")


def _fail_on(problems: list[str], culprit: str) -> None:
    if problems:
        pytest.fail(f"{culprit} left resources unclosed:\n" + "\n".join(problems), pytrace=False)


def _set_new_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def _release(own_loop: asyncio.AbstractEventLoop) -> list[str]:
    """Close the test's own loop; a different loop left current and open is a leak (closed)."""
    current = _current_loop()
    asyncio.set_event_loop(None)
    own_loop.close()
    if current is None or current is own_loop or current.is_closed() or current.is_running():
        return []
    current.close()
    return [f"  an event loop left as the current loop and never closed: {current!r}"]


def _current_loop() -> asyncio.AbstractEventLoop | None:
    """The thread's current loop, without creating one (set_event_loop was called already)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            return None
