"""The live console in a real headless Chromium, against real stacks.

Chromium is Debian's package, driven over the DevTools protocol (``support.browser``); without
it these tests fail (``.ci/run`` installs it). What each test reads from the page is what the
page rendered (the DOM), and what it compares that with comes from the stack's own records: the
portfolio's snapshots on the PORTFOLIO stream, the latch in its KV bucket, the EmergencyStop as
``qtrader ess status`` prints it, each workload's ``/health``.

- A 120-position load through a real portfolio's hub (500 fills in 10 s on NATS, which the
  portfolio books and forwards, with its snapshots): the page's rendered batch number catches
  up with what the server sent it, without gaps or drops, its frames keep coming, its lists
  stay capped, and it shows the portfolio's last snapshot.
- A stream crafted by the test (the one place: a real stream cannot lose a batch on demand)
  drives the page's own rules: a connection refused three times is retried with exponential
  back-off, and a batch number that skips is shown as a gap marker.
- ``qtrader up`` (four workloads, its control plane) runs once for the rest: the page shows the
  stack's state and the portfolio's equity; ``qtrader ess trip`` shows on the page within 1 s
  of the command's return (a MutationObserver stamps the DOM change); the portfolio killed and
  restarted by ``up``'s supervisor: the page reconnects by itself, marks the gap, and shows
  the new process's figures.

Screenshots and the measured figures are kept under the test's tmp dir and
``build/artifacts/console/`` (ignored by git).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, WebSocket

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    AccountEntry,
    Fill,
    HaltLatch,
    IncomeType,
    PolicyRevision,
    PortfolioSnapshot,
    Side,
    account_entry_id,
)
from qtrader.contracts.policy import parse_policy
from qtrader.control.ess_status import parse_time
from qtrader.local.control import publish_policy
from qtrader.local.nats_server import EmbeddedNats
from qtrader.viewer.console import console_router
from support.browser import Chromium, Page, devtools
from support.streams import read_all
from support.up import ROOT, UpStack, example_policy, example_stop, running_up
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "build" / "artifacts" / "console"
COOLDOWN_S = 30
TRIP_SHOWN_WITHIN_S = 1.0
LOAD_SYMBOLS = 120
LOAD_EVENTS = 500
LOAD_OVER_S = 10.0
CATCH_UP_S = 3.0
KEPT_ROWS = 100  # console.js KEEP: the newest rows each list keeps

# What the page rendered, in one evaluation (one frame's DOM).
RENDERED = """(() => {
  const $ = (id) => document.getElementById(id);
  const stop = document.querySelector('.stop[data-name="main"]');
  const rows = [...document.querySelectorAll('#workloads tr')];
  return {
    connection: $('connection').dataset.state,
    seq: Number($('last-seq').dataset.seq),
    gaps: Number($('gaps').dataset.count),
    reconnects: Number($('gaps').dataset.reconnects),
    dropped: Number($('dropped').dataset.count),
    gapMarker: $('gap-marker').hidden ? '' : $('gap-marker').textContent,
    stop: stop ? {state: stop.dataset.state, text: stop.innerText} : null,
    cooldownLeftMs: stop && stop.querySelector('.cooldown')
      ? Number(stop.querySelector('.cooldown').dataset.leftMs) : null,
    latch: {state: $('latch').dataset.state, revision: Number($('latch').dataset.revision)},
    equity: $('equity').dataset.value,
    equityText: $('equity').textContent,
    snapshot: Number($('snapshot-seq').dataset.seq),
    fillsApplied: $('fills-applied').dataset.value,
    income: Object.fromEntries(['fees-by-asset', 'funding', 'transfers', 'other-income'].map(
      (id) => [id, {value: $(id).dataset.value, text: $(id).textContent}])),
    positionFunding: Object.fromEntries([...document.querySelectorAll('#positions tr')].map(
      (r) => [r.dataset.symbol, r.lastElementChild.textContent])),
    positions: Number($('positions-count').dataset.count),
    openPositions: Number($('positions-count').dataset.open),
    fillRows: Number($('fills').dataset.count),
    orderRows: Number($('orders').dataset.count),
    workloads: Object.fromEntries(rows.map((r) => [r.dataset.service, r.dataset.status])),
    policy: $('policy').textContent,
  };
})()"""


# --- the browser and the artifacts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    browser = Chromium(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield browser
    finally:
        browser.stop()


@contextlib.asynccontextmanager
async def opened(chromium: Chromium, url: str) -> AsyncIterator[Page]:
    """A tab at ``url`` once the server answers it (a workload just started may not yet: the
    tab would show the browser's error page), closed afterwards."""

    async def served() -> bool:
        async with httpx.AsyncClient(timeout=2.0) as client:
            return (await client.get(url)).status_code == 200

    await eventually(served, timeout_s=30, what=f"{url} to be served")
    async with devtools(chromium) as tools:
        page = await tools.open(url)
        try:
            yield page
        finally:
            await tools.call("Target.closeTarget", {"targetId": page.target})


async def rendered(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate(RENDERED)
    return value


async def keep_screenshot(page: Page, name: str, tmp_path: Path) -> None:
    await page.screenshot(tmp_path / name, ARTIFACTS / name)


def keep_figures(name: str, figures: dict[str, Any]) -> None:
    """The measured figures, printed (pytest -rP shows them) and kept beside the screenshots."""
    print(f"\n{name}: {json.dumps(figures)}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


def as_shown(value: Decimal) -> str:
    """How the page must round money: 2 places, half away from zero (an independent rule)."""
    return f"{value.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):f}"


async def stored_snapshot(
    url: str, sequence: int, *, stack: str | None = None
) -> PortfolioSnapshot:
    """The newest stored snapshot numbered ``sequence`` (a restarted portfolio counts from 1)."""
    for _ in range(20):  # the page may show it a moment before the stream has it
        snapshots = await read_all(
            url,
            stream=subjects.PORTFOLIO.name,
            subject=subjects.PORTFOLIO_SNAPSHOT,
            message_type=PortfolioSnapshot,
        )
        found = [s for s in snapshots if s.sequence == sequence]
        if found:
            return found[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no snapshot {sequence} on the PORTFOLIO stream")


def assert_shows_snapshot(page: dict[str, Any], snapshot: PortfolioSnapshot) -> None:
    assert page["equity"] == str(snapshot.equity)
    assert page["equityText"] == as_shown(snapshot.equity)
    assert page["fillsApplied"] == str(snapshot.fills_applied)
    assert page["positions"] == len(snapshot.positions)
    assert page["openPositions"] == sum(1 for p in snapshot.positions if p.quantity != 0)


# --- 1: 120 positions and 500 events in 10 s through a real portfolio's hub ----------------------

FRAME_PROBE = """(() => {
  const probe = {max: 0, frames: 0, last: performance.now(), stop: false};
  window.__frames = probe;
  const tick = (now) => {
    probe.max = Math.max(probe.max, now - probe.last);
    probe.last = now;
    probe.frames += 1;
    if (!probe.stop) requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  return true;
})()"""


@pytest.fixture
async def lone_portfolio(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Worker]:
    bus = Bus(url=nats_server.url, client_name="test-console-policy")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, parse_policy(_policy_document("console-load")))
    await bus.close()
    worker = start_worker("portfolio", nats_url=nats_server.url, log_dir=tmp_path)
    try:
        yield worker
    finally:
        worker.stop()


def _policy_document(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": name},
        "spec": {"mode": "paper", "symbols": ["BTCUSDT"]},
    }


def _load_fills() -> list[Fill]:
    """500 fills over 120 symbols: each symbol opened first, then traded both ways."""
    symbols = [f"L{n:03d}USDT" for n in range(LOAD_SYMBOLS)]
    now_ms = int(time.time() * 1000)
    return [
        Fill(
            fill_id=f"load-{i}",
            client_order_id=f"load-{i}",
            symbol=symbols[i % LOAD_SYMBOLS],
            side=Side.BUY if i < LOAD_SYMBOLS or i % 3 else Side.SELL,
            quantity=Decimal("0.5"),
            price=Decimal(100 + i % 13),
            fee=Decimal("0.02"),
            ts_ms=now_ms + i,
        )
        for i in range(LOAD_EVENTS)
    ]


async def _feed(url: str) -> float:
    """Publish the load, evenly over LOAD_OVER_S; returns when the last publish returned."""
    bus = Bus(url=url, client_name="test-console-load")
    await bus.connect()
    try:
        started = time.monotonic()
        for i, fill in enumerate(_load_fills()):
            await asyncio.sleep(
                max(0.0, started + i * LOAD_OVER_S / LOAD_EVENTS - time.monotonic())
            )
            await bus.publish(subjects.fill_subject(fill.symbol), fill)
        return time.monotonic()
    finally:
        await bus.close()


async def _page_metrics(page: Page) -> dict[str, float]:
    """Chromium's counters for the page (seconds of script, layout, all tasks so far)."""
    metrics = (await page.call("Performance.getMetrics"))["metrics"]
    return {m["name"]: float(m["value"]) for m in metrics}


async def _sent_to_page(worker: Worker) -> tuple[int, int]:
    """(batches sent, events dropped) by the server to the one viewer it has: the page."""
    async with httpx.AsyncClient(timeout=3.0) as client:
        stats = (await client.get(f"{worker.base_url}/viewer/stats")).json()
    [viewer] = stats["per_client"]
    return int(viewer["sent_batches"]), int(viewer["dropped"])


@pytest.mark.invariants_exempt(
    reason="the test plays the venue: 500 fills of its own over 120 symbols load the console"
)
async def test_console_when_120_positions_and_500_events_in_10_s_then_it_keeps_up(
    chromium: Chromium, lone_portfolio: Worker, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    worker = lone_portfolio
    async with opened(chromium, f"{worker.base_url}/console") as page:
        await page.wait_for(
            "document.getElementById('connection').dataset.state === 'live'", timeout_s=15
        )
        await page.evaluate(FRAME_PROBE)
        await page.call("Performance.enable")
        before = await _page_metrics(page)
        last_publish = await _feed(nats_server.url)
        caught_up_s = None
        while time.monotonic() - last_publish < CATCH_UP_S + 2:
            sent, dropped = await _sent_to_page(worker)
            shown = await rendered(page)
            if shown["seq"] >= sent and shown["fillsApplied"] == str(LOAD_EVENTS):
                caught_up_s = time.monotonic() - last_publish
                break
            await asyncio.sleep(0.05)
        frames = await page.evaluate("window.__frames.stop = true, window.__frames")
        after = await _page_metrics(page)
        shown = await rendered(page)
        snapshot = await stored_snapshot(nats_server.url, shown["snapshot"])
        await keep_screenshot(page, "console-load.png", tmp_path)
    keep_figures(
        "console-load",
        {
            "caught_up_after_last_publish_s": caught_up_s,
            "max_frame_interval_ms": round(frames["max"], 1),
            "frames": frames["frames"],
            "page_script_s": round(after["ScriptDuration"] - before["ScriptDuration"], 3),
            "page_layout_s": round(after["LayoutDuration"] - before["LayoutDuration"], 3),
            "page_busy_s": round(after["TaskDuration"] - before["TaskDuration"], 3),
            "positions": shown["positions"],
            "batches": shown["seq"],
        },
    )
    assert caught_up_s is not None, f"not caught up {CATCH_UP_S + 2} s after the last publish"
    assert caught_up_s <= CATCH_UP_S, shown
    assert (shown["gaps"], shown["dropped"], dropped) == (0, 0, 0)
    assert shown["connection"] == "live"
    assert_shows_snapshot(shown, snapshot)
    assert snapshot.fills_applied == LOAD_EVENTS
    assert shown["openPositions"] == LOAD_SYMBOLS
    assert shown["fillRows"] == KEPT_ROWS  # 500 fills came; the page kept the newest
    assert frames["max"] < 1000, f"the page froze for {frames['max']:.0f} ms"
    assert page.problems == []


# --- 1b: what moved the account besides our trades, as the portfolio booked it ----------------


def _income_stream() -> list[Fill | AccountEntry]:
    """A long position, one fee paid in USDT and one in BNB; funding of both signs; transfers in
    USDT and in BNB; a rebate (other income)."""
    now_ms = int(time.time() * 1000)

    def fill(n: int, fee: str, fee_asset: str, fee_usdt: Decimal | None) -> Fill:
        return Fill(
            fill_id=f"inc-{n}",
            client_order_id=f"inc-{n}",
            symbol="BTCUSDT",
            side=Side.BUY,
            quantity=Decimal("0.01"),
            price=Decimal(30_000 + n),
            fee=Decimal(fee),
            fee_asset=fee_asset,
            fee_usdt=fee_usdt,
            ts_ms=now_ms + n,
        )

    def entry(n: int, kind: IncomeType, amount: str, asset: str = "USDT") -> AccountEntry:
        symbol = "BTCUSDT" if kind is IncomeType.FUNDING_FEE else None
        return AccountEntry(
            entry_id=account_entry_id(kind, str(n)),
            income_type=kind,
            symbol=symbol,
            asset=asset,
            amount=Decimal(amount),
            ts_ms=now_ms + n,
        )

    return [
        fill(1, "0.12", "USDT", None),
        fill(2, "0.00018", "BNB", Decimal("0.108")),
        entry(3, IncomeType.FUNDING_FEE, "-0.0375"),
        entry(4, IncomeType.FUNDING_FEE, "0.0125"),
        entry(5, IncomeType.TRANSFER, "250"),
        entry(6, IncomeType.TRANSFER, "-100.505"),
        entry(7, IncomeType.TRANSFER, "0.5", "BNB"),
        entry(8, IncomeType.COMMISSION_REBATE, "0.004"),
    ]


def _by_asset(amounts: Any) -> str:
    return " ".join(f"{a.asset}:{a.amount}" for a in amounts)


@pytest.mark.invariants_exempt(
    reason="the test plays the venue: fills and account entries of its own show on the console"
)
async def test_console_shows_funding_commissions_by_asset_and_transfers(
    chromium: Chromium, lone_portfolio: Worker, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    stream = _income_stream()
    bus = Bus(url=nats_server.url, client_name="test-console-income")
    await bus.connect()
    try:
        for message in stream:
            subject = (
                subjects.fill_subject(message.symbol)
                if isinstance(message, Fill)
                else subjects.ACCOUNT_ENTRY
            )
            await bus.publish(subject, message)
    finally:
        await bus.close()
    async with opened(chromium, f"{lone_portfolio.base_url}/console") as page:
        await page.wait_for(
            "document.getElementById('connection').dataset.state === 'live'", timeout_s=15
        )

        async def all_booked() -> bool:
            income = (await rendered(page))["income"]
            return income["other-income"]["value"] not in ("", "0E-8", "0")

        await eventually(all_booked, timeout_s=15, what="the entries on the page")
        shown = await rendered(page)
        snapshot = await stored_snapshot(nats_server.url, shown["snapshot"])
        await keep_screenshot(page, "console-income.png", tmp_path)
    assert snapshot.entries_applied == sum(isinstance(m, AccountEntry) for m in stream)
    income = shown["income"]
    assert income["fees-by-asset"]["value"] == _by_asset(snapshot.fees_by_asset)
    fees = {a.asset: a.amount for a in snapshot.fees_by_asset}
    assert (
        income["fees-by-asset"]["text"] == f"{fees['BNB']:.8f} BNB, {as_shown(fees['USDT'])} USDT"
    )
    assert income["funding"]["value"] == str(snapshot.funding)
    assert income["funding"]["text"] == as_shown(snapshot.funding)  # negative: its own sign
    assert income["transfers"]["value"] == _by_asset(snapshot.transfers_by_asset)
    moved = {a.asset: a.amount for a in snapshot.transfers_by_asset}
    assert (
        income["transfers"]["text"] == f"+{moved['BNB']:.8f} BNB, +{as_shown(moved['USDT'])} USDT"
    )
    assert income["other-income"]["value"] == str(snapshot.other_income)
    (position,) = snapshot.positions
    assert shown["positionFunding"] == {"BTCUSDT": as_shown(position.funding)}


# --- 2: the page's own rules, on a crafted stream -------------------------------------------------


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class CraftedStream:
    """Serves the real console page, and an /events that refuses the first ``refuse``
    connections (closed at once), then sends the state and batches 1, 2 and 4."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.accepted_at: list[float] = []
        self.app = FastAPI()
        self.app.include_router(console_router())
        self.app.add_api_websocket_route("/events", self.events)

    async def events(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.accepted_at.append(time.monotonic())
        if len(self.accepted_at) <= self.refuse:
            await websocket.close()
            return
        await websocket.send_json(
            {"seq": 0, "events": [{"kind": "state", "stops": []}], "dropped": 0}
        )
        for seq, dropped in ((1, 0), (2, 0), (4, 3)):  # batch 3 never sent
            await websocket.send_json({"seq": seq, "events": [], "dropped": dropped})
        with contextlib.suppress(Exception):  # until the page goes away
            while True:
                await websocket.receive_text()


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = _InLoopServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started, timeout_s=10, what="uvicorn to start")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


async def test_console_when_refused_then_backs_off_exponentially_and_marks_a_skipped_batch(
    chromium: Chromium,
) -> None:
    stream = CraftedStream(refuse=3)
    async with (
        serving(stream.app) as port,
        opened(chromium, f"http://127.0.0.1:{port}/console") as page,
    ):
        await page.wait_for(
            "Number(document.getElementById('last-seq').dataset.seq) === 4", timeout_s=15
        )
        shown = await rendered(page)
    waits = [b - a for a, b in zip(stream.accepted_at, stream.accepted_at[1:], strict=False)]
    keep_figures("console-backoff", {"waits_between_attempts_s": [round(w, 3) for w in waits]})
    # Back-off b = 0.5 s doubling, each wait drawn from [b/2, b] (jitter); 0.25 s of slack.
    for attempt, wait in enumerate(waits):
        nominal = 0.5 * 2**attempt
        assert nominal / 2 <= wait <= nominal + 0.25, waits
    assert shown["connection"] == "live"
    assert (shown["gaps"], shown["dropped"]) == (1, 3)
    assert "batches 3-3 never arrived" in shown["gapMarker"]


# --- 3: qtrader up, its control plane and its supervisor ------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpStack]:
    policy = example_policy().replace("minConfidence: 0.45", "minConfidence: 0.0")
    stop = example_stop(cooldownSeconds=COOLDOWN_S, requireManualReset=True, ackTimeoutSeconds=2)
    with running_up(tmp_path_factory.mktemp("console-up"), policy=policy, stop=stop) as up:
        yield up


async def _latch_and_policy(url: str) -> tuple[HaltLatch, PolicyRevision]:
    """The latch and the policy in force, from their KV buckets."""
    bus = Bus(url=url, client_name="test-console-records")
    await bus.connect()
    try:
        latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        policy = await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    finally:
        await bus.close()
    assert isinstance(latch, HaltLatch)
    assert isinstance(policy, PolicyRevision)
    return latch, policy


async def _health_statuses(stack: UpStack) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=3.0) as client:
        return {
            role: str((await client.get(f"{stack.base_url(role)}/health")).json()["status"])
            for role in stack.state["health"]
        }


TRADING = """(() => {
  const $ = (id) => document.getElementById(id);
  const stop = document.querySelector('.stop[data-name="main"]');
  return $('connection').dataset.state === 'live' && stop !== null
    && Number($('fills-applied').dataset.value) > 0
    && document.querySelectorAll('#workloads tr').length === 4;
})()"""


async def test_console_shows_the_stacks_state_and_the_portfolios_equity(
    chromium: Chromium, stack: UpStack, tmp_path: Path
) -> None:
    assert stack.state["console"] == f"{stack.base_url('portfolio')}/console"
    async with opened(chromium, stack.state["console"]) as page:
        await page.wait_for(TRADING, timeout_s=45)

        async def same_health() -> bool:
            return (await rendered(page))["workloads"] == await _health_statuses(stack)

        await eventually(same_health, timeout_s=10, what="the page's health to match /health")
        shown = await rendered(page)
        snapshot = await stored_snapshot(stack.url, shown["snapshot"])
        resource = await stack.resource()
        latch, policy = await _latch_and_policy(stack.url)
        await keep_screenshot(page, "console-state.png", tmp_path)
        problems = list(page.problems)
    assert_shows_snapshot(shown, snapshot)
    assert shown["stop"]["state"] == resource["status"]["state"] == "Armed"
    assert shown["latch"] == {"state": latch.state.value, "revision": latch.revision}
    assert shown["policy"] == f"{policy.name} rev {policy.revision} ({policy.spec.mode.value})"
    assert shown["gaps"] == shown["dropped"] == 0
    assert problems == []


TRIP_STAMP = """(() => {
  window.__tripShownAt = null;
  const stamp = () => {
    const stop = document.querySelector('.stop[data-name="main"]');
    if (window.__tripShownAt === null && stop && stop.dataset.state === 'Tripped') {
      window.__tripShownAt = Date.now();
    }
  };
  new MutationObserver(stamp).observe(document.getElementById('stops'),
    {subtree: true, childList: true, attributes: true});
  return true;
})()"""


async def test_console_shows_a_trip_within_a_second_of_the_command(
    chromium: Chromium, stack: UpStack, tmp_path: Path
) -> None:
    async with opened(chromium, stack.state["console"]) as page:
        await page.wait_for(TRADING, timeout_s=45)
        assert (await rendered(page))["stop"]["state"] == "Armed"
        await page.evaluate(TRIP_STAMP)
        started = time.time()
        result = await stack.cli("ess", "trip", "--reason", "console drill")
        returned = time.time()
        assert result.code == 0, result.output
        shown_ms = await page.wait_for("window.__tripShownAt", timeout_s=5)
        shown = await rendered(page)
        read_ms = time.time() * 1000
        status = (await stack.resource())["status"]
        await keep_screenshot(page, "console-tripped.png", tmp_path)
        problems = list(page.problems)
    latency_s = shown_ms / 1000 - returned
    keep_figures(
        "console-trip",
        {
            "shown_after_command_returned_s": round(latency_s, 3),
            "shown_after_command_started_s": round(shown_ms / 1000 - started, 3),
            "command_took_s": round(returned - started, 3),
            # From the control plane's decision (status.trippedAt) to the page's DOM.
            "shown_after_tripped_at_s": round(
                shown_ms / 1000 - parse_time(status["trippedAt"]).timestamp(), 3
            ),
        },
    )
    assert latency_s <= TRIP_SHOWN_WITHIN_S
    text = shown["stop"]["text"]
    assert status["state"] == "Tripped"
    assert status["trippedBy"] in text
    assert status["reason"] in text
    # The countdown is redrawn every second: it shows the time left at most 1 s before it was
    # read, give or take the page's estimate of the server's clock.
    left_ms = parse_time(status["cooldownUntil"]).timestamp() * 1000 - read_ms
    assert left_ms - 250 <= shown["cooldownLeftMs"] <= left_ms + 1250
    assert shown["latch"] == {"state": "HALTED", "revision": status["latchRevision"]}
    assert problems == []


def _pid_serving(port: int) -> int:
    """The pid of the workload process ``qtrader up`` started with ``--health-port port``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                b"--health-port" in argv
                and argv[argv.index(b"--health-port") + 1] == str(port).encode()
            ):
                return int(entry.name)
    raise AssertionError(f"no process serves port {port}")


CONNECTION_LOG = """(() => {
  window.__connection = [document.getElementById('connection').dataset.state];
  new MutationObserver(() => {
    const state = document.getElementById('connection').dataset.state;
    const seen = window.__connection;
    if (seen[seen.length - 1] !== state) seen.push(state);
  }).observe(document.getElementById('connection'), {attributes: true});
  return true;
})()"""


WORKERS = """[...document.querySelectorAll('#workloads tr')].map(
  (r) => [r.dataset.service, r.dataset.worker, r.dataset.status])"""


async def _portfolio_rows(page: Page) -> dict[str, str]:
    """The portfolio workers the page lists: worker id -> status shown."""
    rows = await page.evaluate(WORKERS)
    return {worker: status for service, worker, status in rows if service == "portfolio"}


async def test_console_when_the_portfolio_restarts_then_reconnects_and_marks_the_gap(
    chromium: Chromium, stack: UpStack, tmp_path: Path
) -> None:
    port = int(stack.base_url("portfolio").rsplit(":", 1)[1])
    async with opened(chromium, stack.state["console"]) as page:
        await page.wait_for(TRADING, timeout_s=45)
        await page.evaluate(CONNECTION_LOG)
        killed_pid = _pid_serving(port)
        old_worker = f"{socket.gethostname()}-{killed_pid}"  # a worker's default id
        assert old_worker in await _portfolio_rows(page)
        os.kill(killed_pid, signal.SIGKILL)  # up's supervisor starts it again
        killed = time.monotonic()
        await page.wait_for(
            "document.getElementById('gaps').dataset.reconnects === '1'"
            " && document.getElementById('connection').dataset.state === 'live'",
            timeout_s=30,
        )
        back_s = time.monotonic() - killed
        states = await page.evaluate("window.__connection")
        await page.wait_for(
            "Number(document.getElementById('snapshot-seq').dataset.seq) > 0", timeout_s=10
        )
        shown = await rendered(page)
        snapshot = await stored_snapshot(stack.url, shown["snapshot"])
        new_worker = f"{socket.gethostname()}-{_pid_serving(port)}"

        async def old_silent_new_heard() -> bool:
            rows = await _portfolio_rows(page)
            return rows.get(old_worker) == "SILENT" and rows.get(new_worker) in ("OK", "DEGRADED")

        await eventually(old_silent_new_heard, timeout_s=15, what="the killed worker shown silent")
        await keep_screenshot(page, "console-reconnected.png", tmp_path)
        exceptions = [p for p in page.problems if p.startswith("exception")]
    keep_figures(
        "console-reconnect", {"live_again_after_kill_s": round(back_s, 3), "states": states}
    )
    assert states[0] == "live"
    assert "reconnecting" in states
    assert states[-1] == "live"
    assert "connection lost at" in shown["gapMarker"]
    assert_shows_snapshot(shown, snapshot)
    assert exceptions == []
