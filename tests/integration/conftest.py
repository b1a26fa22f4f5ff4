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

And after each test that trades, the safety invariants are checked from what it left behind
(``trading_invariants``, with ``support.invariants``): a test gets the check by using one of the
fixtures that give it a trading bus (``TRADING_FIXTURES``), and opts out only with
``@pytest.mark.invariants_exempt(reason=...)`` saying what it violates on purpose.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from qtrader.local.nats_server import EmbeddedNats
from support.binance_sim import forget_venues, unreadable_venues, venues_seen
from support.emulator import Cluster, serve
from support.invariants import Check, assert_invariants, stacks_with_a_policy
from support.leaks import collect_leaks

# Fixtures whose value gives a test a nats-server the workloads trade on, and how to reach it
# (``stack``: test_local_ess's ``qtrader up``, module-scoped).
TRADING_FIXTURES = ("nats_server", "stack")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "invariants_exempt(*checks, reason): this test breaks these checks of the end-of-test "
        "invariants on purpose (exposure, duplicates, orders, ledger; all when none is named), "
        "e.g. it stores a duplicate to prove the consumers skip it, or plays the venue itself",
    )


@pytest.fixture(autouse=True)
def trading_invariants(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test: exposure, duplicates and the portfolio's exact account, on the bus it
    traded on (nothing to check when it did not trade). The bus's fixture is set up here first,
    so it is still running when this is torn down; worker processes a test starts itself are
    gone by then, so the portfolio must have applied every fill before the test ends."""
    skip = _exempt(request.node.get_closest_marker("invariants_exempt"))
    servers = [
        request.getfixturevalue(name) for name in TRADING_FIXTURES if name in request.fixturenames
    ]
    forget_venues()
    yield
    if skip != frozenset(Check):
        for server in servers:
            _check(server, skip)


async def _check_every_stack(
    url: str, venues: Any, skip: frozenset[Check]
) -> list[tuple[str | None, Any]]:
    """Each stack a policy was published to (an operator serves one per policy), checked."""
    reports = []
    for stack in await stacks_with_a_policy(url) or [None]:
        report = await assert_invariants(url, stack=stack, venues=venues, skip=skip)
        if report is not None:
            reports.append((stack, report))
    return reports


def _exempt(marker: pytest.Mark | None) -> frozenset[Check]:
    if marker is None:
        return frozenset()
    if not marker.kwargs.get("reason"):
        pytest.fail("invariants_exempt needs a reason= saying what the test breaks and why")
    return frozenset(Check(name) for name in marker.args) or frozenset(Check)


def _check(server: Any, skip: frozenset[Check]) -> None:
    if isinstance(server, EmbeddedNats) and not server.running:
        return  # the test stopped it for good: nothing left to read
    started = time.monotonic()
    venues = venues_seen()
    loop = asyncio.new_event_loop()  # of its own: the test's loop is closed, and stays current
    try:
        reports = loop.run_until_complete(_check_every_stack(server.url, venues, skip))
    finally:
        loop.close()
    for stack, report in reports:  # the figures, shown with the test's output (-rP, or on failure)
        took = time.monotonic() - started
        print(f"\ninvariants of {stack or 'the stack'} ({took:.2f} s): {report.summary()}")
    if reports and unreadable_venues():
        pytest.fail(
            f"the records of the Binance server(s) {unreadable_venues()} could not be read when "
            "they stopped: exposure not checked on the venue",
            pytrace=False,
        )


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
