"""Restart continuity: a killed marketdata or inference comes back where the streams say it was.

Real processes on a real nats-server, killed with SIGKILL. What the streams hold afterwards is
read back from the server and held against what an uninterrupted run makes: the seeded
generator itself, the replayed files row by row, and an inference process that was never
killed, on a second server, over the same candles. Prices taken by the portfolio are checked to
be stored candles only, including when a duplicate publish carries another price.
"""

from __future__ import annotations

import asyncio
import itertools
import signal as unix_signal
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from nats.aio.client import Client

from qtrader.bus.nats_bus import Bus
from qtrader.bus.outbox import Outbox
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    Fill,
    Pack,
    PortfolioSnapshot,
    Side,
    Signal,
    TradingState,
    decode_all,
)
from qtrader.contracts.policy import TradingPolicy, parse_policy
from qtrader.inference.warmup import read_warmup
from qtrader.instruments import paper_exchange_info
from qtrader.local.control import publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader.marketdata.csv_replay import read_klines
from qtrader.marketdata.resume import read_stored
from qtrader.marketdata.synthetic import Regime, SyntheticConfig, SyntheticMarket
from qtrader_tools.candles import flat_candle
from support.ledger_check import last_snapshot
from support.streams import publish_raw, read_all, read_raw
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

PAIR = ("BTCUSDT", "ETHUSDT")
TRIO = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
WINDOW = 32
SAMPLES = Path(__file__).parents[2] / "examples" / "data"
REPLAY_FILES = tuple(SAMPLES / f"{symbol}-1m-sample.csv" for symbol in PAIR)


def _policy(symbols: Sequence[str]) -> TradingPolicy:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "continuity-test"},
            "spec": {"symbols": list(symbols)},
        }
    )


async def _control(url: str, symbols: Sequence[str]) -> Bus:
    bus = Bus(url=url, client_name="test-continuity")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, _policy(symbols))
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    return bus


@pytest.fixture
async def control_pair(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await _control(nats_server.url, PAIR)
    try:
        yield bus
    finally:
        await bus.close()


async def _candles(url: str) -> list[Candle]:
    return await read_all(
        url, stream="QT_MARKET", subject="qtrader.market.candle.*", message_type=Candle
    )


async def _signals(url: str) -> list[Signal]:
    return await read_all(url, stream="QT_SIGNALS", subject="qtrader.signal.*", message_type=Signal)


async def _until_stored(url: str, count: int, worker: Worker, *, timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if len(await _candles(url)) >= count:
            return
        assert worker.process.poll() is None, worker.log()[-3000:]
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {count} candles:\n{worker.log()[-3000:]}")


def _by_symbol(candles: list[Candle]) -> dict[str, list[Candle]]:
    grouped: dict[str, list[Candle]] = {}
    for candle in candles:
        grouped.setdefault(candle.symbol, []).append(candle)
    return grouped


def _published(worker: Worker, symbol: str) -> int:
    return int(worker.metric("qtrader_candles_published_total", symbol=symbol))


def _duplicates(worker: Worker) -> float:
    return sum(worker.metric("qtrader_candles_duplicate_total", symbol=s) for s in TRIO)


def _ended(worker: Worker) -> bool:
    detail = str(worker.dependency("feed").get("detail", ""))
    return "ended" in detail


def _position_fills() -> list[Fill]:
    """A long in each of the pair, so the portfolio's snapshots show each one's mark."""
    return [
        Fill(
            fill_id=f"continuity-{symbol}",
            client_order_id=f"qt-continuity-{symbol}",
            symbol=symbol,
            side=Side.BUY,
            quantity=Decimal("0.01"),
            price=Decimal(100),
            fee=Decimal(0),
            ts_ms=1_700_000_000_000,
        )
        for symbol in PAIR
    ]


def _marks(snapshot: PortfolioSnapshot | None) -> dict[str, Decimal]:
    return {} if snapshot is None else {p.symbol: p.mark_price for p in snapshot.positions}


# --- synthetic --------------------------------------------------------------------------------


@pytest.mark.invariants_exempt(
    "orders", reason="the test plays the venue: it publishes fills of no order for a position"
)
async def test_synthetic_marketdata_when_killed_and_restarted_then_the_seeded_path_goes_on(
    nats_server: EmbeddedNats, control_pair: Bus, tmp_path: Path
) -> None:
    url = nats_server.url
    for fill in _position_fills():
        await control_pair.publish(subjects.fill_subject(fill.symbol), fill)
    portfolio = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    market_args = ("--seed", "21", "--candles-per-second", "25")
    first = start_worker("marketdata", nats_url=url, log_dir=tmp_path, args=market_args)
    second: Worker | None = None
    try:
        await _until_stored(url, 50, first)
        first.stop(kill=True)
        before = Counter(c.symbol for c in await _candles(url))

        second = start_worker(
            "marketdata", nats_url=url, log_dir=tmp_path, args=(*market_args, "--max-candles", "40")
        )
        await eventually(lambda: _ended(second), timeout_s=60, what="the feed", worker=second)
        stored = _by_symbol(await _candles(url))

        # Each symbol: one candle per minute from the run's start, no gap, no repeat...
        start_ms = stored["BTCUSDT"][0].open_time_ms
        for symbol in PAIR:
            times = [c.open_time_ms for c in stored[symbol]]
            assert times == [start_ms + i * 60_000 for i in range(len(times))], symbol
        # ...and every candle the one the seed makes, as if the run had never stopped.
        config = SyntheticConfig(symbols=PAIR, seed=21, regime=Regime.MIXED, start_ms=start_ms)
        steps = max(len(candles) for candles in stored.values())
        market = SyntheticMarket(config, paper_exchange_info()).candles()
        uninterrupted = _by_symbol(list(itertools.islice(market, steps * len(PAIR))))
        for symbol in PAIR:
            assert stored[symbol] == uninterrupted[symbol][: len(stored[symbol])], symbol
        # The restarted run counted as published exactly what the stream stored from it.
        for symbol in PAIR:
            assert _published(second, symbol) == len(stored[symbol]) - before[symbol] > 0
        assert _duplicates(second) == 0
        assert "resuming BTCUSDT after its stored candle" in second.log()
        # Each step stored as one pack of both symbols' candles, none alone.
        packs = await read_raw(url, stream="QT_MARKET", subject=subjects.CANDLE_STEP)
        carried = [decode_all(pack, Candle).messages for pack in packs]
        assert [[c.symbol for c in step] for step in carried] == [list(PAIR)] * steps

        # The portfolio marks at the last stored close, never at a price the stream refused.
        last_close = {symbol: stored[symbol][-1].close for symbol in PAIR}

        async def marked() -> bool:
            return _marks(await last_snapshot(url)) == last_close

        await _wait(marked, what="the marks at the last stored closes", worker=portfolio)
    finally:
        for worker in (first, second, portfolio):
            if worker is not None:
                worker.stop()


async def test_synthetic_marketdata_when_killed_with_candles_in_its_outbox_then_they_go_first(
    nats_server: EmbeddedNats, control_pair: Bus, tmp_path: Path
) -> None:
    url = nats_server.url
    market_args = ("--seed", "31", "--candles-per-second", "25")
    first = start_worker("marketdata", nats_url=url, log_dir=tmp_path, args=market_args)
    second: Worker | None = None
    try:
        await _until_stored(url, 30, first)
        await asyncio.to_thread(nats_server.stop)  # the broker goes: candles wait on disk
        await eventually(
            lambda: first.metric("qtrader_outbox_depth") >= 10,
            timeout_s=20,
            what="candles held in the outbox",
            worker=first,
        )
        first.stop(kill=True)
        held = _outbox_depth(tmp_path / "outbox")
        await asyncio.to_thread(nats_server.start)
        before = len(await _candles(url))

        second = start_worker(
            "marketdata", nats_url=url, log_dir=tmp_path, args=(*market_args, "--max-candles", "30")
        )
        await eventually(lambda: _ended(second), timeout_s=60, what="the feed", worker=second)
        stored = _by_symbol(await _candles(url))

        start_ms = stored["BTCUSDT"][0].open_time_ms
        config = SyntheticConfig(symbols=PAIR, seed=31, regime=Regime.MIXED, start_ms=start_ms)
        market = SyntheticMarket(config, paper_exchange_info()).candles()
        uninterrupted = _by_symbol(list(itertools.islice(market, 2 * 200)))
        for symbol in PAIR:
            assert stored[symbol] == uninterrupted[symbol][: len(stored[symbol])], symbol
        # The held candles were stored first; the new run published only what followed them.
        total = sum(map(len, stored.values()))
        assert sum(_published(second, symbol) for symbol in PAIR) == total - before - held
        assert held >= 10
        assert _duplicates(second) == 0
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop()


def _outbox_depth(directory: Path) -> int:
    """The candles held in the outbox (a step's pack holds several)."""
    (path,) = directory.glob("marketdata-*.db")
    outbox = Outbox(path)
    try:
        entries = outbox.oldest(len(outbox))
        return sum(len(decode_all(entry.payload, Candle).messages) for entry in entries)
    finally:
        outbox.close()


async def _wait(condition: object, *, what: str, worker: Worker, timeout_s: float = 30) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await condition():
            return
        assert worker.process.poll() is None, worker.log()[-3000:]
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{worker.log()[-3000:]}")


@pytest.mark.invariants_exempt(
    "orders", reason="the test plays the venue: it publishes fills of no order for a position"
)
async def test_portfolio_when_a_duplicate_publish_carries_another_price_then_it_is_no_mark(
    nats_server: EmbeddedNats, control_pair: Bus, tmp_path: Path
) -> None:
    url = nats_server.url
    for fill in _position_fills():
        await control_pair.publish(subjects.fill_subject(fill.symbol), fill)
    portfolio = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    try:
        stored = _candle("BTCUSDT", Decimal("352.4"), minute=0)
        await control_pair.publish(subjects.candle_subject("BTCUSDT"), stored)

        async def marked(price: Decimal) -> bool:
            return _marks(await last_snapshot(url)).get("BTCUSDT") == price

        await _wait(lambda: marked(Decimal("352.4")), what="the stored mark", worker=portfolio)

        # What a restarted marketdata used to send: a candle the stream holds, at another
        # price. The stream drops it as a duplicate; core subscribers used to take its price.
        invented = stored.model_copy(update={"close": Decimal("310.8"), "low": Decimal("310.8")})
        await publish_raw(
            url, subjects.candle_subject("BTCUSDT"), invented.encode(), msg_id=stored.dedup_id
        )
        await asyncio.sleep(1.5)  # three snapshot intervals: time enough to show a new mark

        following = _candle("BTCUSDT", Decimal("353.1"), minute=1)
        await control_pair.publish(subjects.candle_subject("BTCUSDT"), following)
        await _wait(lambda: marked(Decimal("353.1")), what="the next mark", worker=portfolio)
        snapshots = await read_all(
            url,
            stream=subjects.PORTFOLIO.name,
            subject=subjects.PORTFOLIO_SNAPSHOT,
            message_type=PortfolioSnapshot,
        )
        btc_marks = {_marks(s).get("BTCUSDT") for s in snapshots}
        assert Decimal("310.8") not in btc_marks
        assert {Decimal("352.4"), Decimal("353.1")} <= btc_marks
        stream = [c.close for c in await _candles(url)]
        assert stream == [Decimal("352.4"), Decimal("353.1")]
    finally:
        portfolio.stop()


def _candle(symbol: str, price: Decimal, *, minute: int) -> Candle:
    return flat_candle(symbol, price, open_time_ms=1_800_000_000_000 + minute * 60_000)


# --- replay -----------------------------------------------------------------------------------


async def test_replay_marketdata_when_killed_and_restarted_then_it_goes_on_at_the_next_row(
    nats_server: EmbeddedNats, control_pair: Bus, tmp_path: Path
) -> None:
    url = nats_server.url
    replay_args = ("--replay", *map(str, REPLAY_FILES), "--candles-per-second", "120")
    rows = {
        symbol: list(read_klines(path, symbol=symbol, interval="1m"))
        for symbol, path in zip(PAIR, REPLAY_FILES, strict=True)
    }
    inference = start_worker("inference", nats_url=url, log_dir=tmp_path)
    first = start_worker("marketdata", nats_url=url, log_dir=tmp_path, args=replay_args)
    second: Worker | None = None
    try:
        await _until_stored(url, 300, first)
        first.stop(kill=True)
        before = Counter(c.symbol for c in await _candles(url))
        assert sum(before.values()) < sum(map(len, rows.values()))  # killed part way

        second = start_worker("marketdata", nats_url=url, log_dir=tmp_path, args=replay_args)
        await eventually(lambda: _ended(second), timeout_s=60, what="the replay", worker=second)
        stored = _by_symbol(await _candles(url))

        for symbol in PAIR:
            assert stored[symbol] == rows[symbol], symbol  # every row once, in order
            assert _published(second, symbol) == len(rows[symbol]) - before[symbol]
        assert _duplicates(second) == 0

        expected = sum(len(r) - (WINDOW - 1) for r in rows.values())
        signals = await _until_signals(url, expected, inference)
        ids = Counter(s.signal_id for s in signals)
        assert len(signals) == expected
        assert max(ids.values()) == 1
    finally:
        for worker in (first, second, inference):
            if worker is not None:
                worker.stop()


async def _until_signals(
    url: str, count: int, worker: Worker, timeout_s: float = 60
) -> list[Signal]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        signals = await _signals(url)
        if len(signals) >= count:
            await asyncio.sleep(0.5)  # and nothing more after it
            return await _signals(url)
        assert worker.process.poll() is None, worker.log()[-3000:]
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {count} signals:\n{worker.log()[-3000:]}")


# --- inference --------------------------------------------------------------------------------


def _market(steps: int) -> list[Candle]:
    config = SyntheticConfig(symbols=TRIO, seed=17, regime=Regime.MIXED)
    market = SyntheticMarket(config, paper_exchange_info())
    return list(itertools.islice(market.candles(), steps * len(TRIO)))


async def _publish_all(bus: Bus, candles: list[Candle], *, packed: bool = False) -> None:
    """Each candle alone on its symbol's subject, or each step's in one pack, as marketdata
    publishes a replayed or synthetic step."""
    if not packed:
        for candle in candles:
            await bus.publish(subjects.candle_subject(candle.symbol), candle)
        return
    for _, step in itertools.groupby(candles, key=lambda candle: candle.open_time_ms):
        await bus.publish(subjects.CANDLE_STEP, Pack(tuple(step)))


async def _signal_packs(url: str) -> list[list[Signal]]:
    """What each message on the signal packs' subject carried."""
    payloads = await read_raw(url, stream="QT_SIGNALS", subject=subjects.SIGNAL_STEP)
    return [decode_all(payload, Signal).messages for payload in payloads]


PACKED = pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])


@PACKED
async def test_inference_when_killed_and_restarted_then_signals_equal_an_uninterrupted_run(
    nats_server: EmbeddedNats, tmp_path: Path, packed: bool
) -> None:
    candles = _market(steps=100)
    half = 60 * len(TRIO)
    expected = len(TRIO) * (100 - (WINDOW - 1))

    # The uninterrupted run, on a server of its own.
    (tmp_path / "whole").mkdir()
    whole_server = EmbeddedNats(store_dir=tmp_path / "whole" / "nats")
    whole_server.start()
    whole_bus = await _control(whole_server.url, TRIO)
    whole = start_worker("inference", nats_url=whole_server.url, log_dir=tmp_path / "whole")
    try:
        await _publish_all(whole_bus, candles, packed=packed)
        uninterrupted = await _until_signals(whole_server.url, expected, whole)
    finally:
        whole.stop()
        await whole_bus.close()
        whole_server.stop()

    url = nats_server.url
    bus = await _control(url, TRIO)
    first = start_worker("inference", nats_url=url, log_dir=tmp_path)
    second: Worker | None = None
    try:
        await _publish_all(bus, candles[:half], packed=packed)
        await _until_signals(url, len(TRIO) * (60 - (WINDOW - 1)) - 6, first)
        first.stop(kill=True)
        await _publish_all(bus, candles[half:], packed=packed)
        # A worker killed in the middle of a batch: it took candles and acknowledged none. The
        # consumer hands them out again only after their ack wait (30 s), after newer ones.
        in_flight = await _take_without_ack(url, 30 // len(TRIO) if packed else 30)
        second = start_worker("inference", nats_url=url, log_dir=tmp_path)
        restarted = await _until_signals(url, expected, second, timeout_s=20)
        assert "were in flight" in second.log()
        assert in_flight == candles[half : half + 30]
        packs = await _signal_packs(url)
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop()
        await bus.close()

    assert len(restarted) == len(uninterrupted) == expected
    if packed:  # each step's signals in one pack, each pack once: made alike after the kill
        assert len(packs) == 100 - (WINDOW - 1)
        assert all(len({s.candle_open_time_ms for s in pack}) == 1 for pack in packs)
        assert sorted(s.signal_id for pack in packs for s in pack) == sorted(
            s.signal_id for s in restarted
        )
    else:
        assert packs == []
    want = {s.signal_id: s for s in uninterrupted}
    assert {s.signal_id for s in restarted} == set(want)
    for signal in restarted:
        assert signal.direction is want[signal.signal_id].direction
        assert signal.price == want[signal.signal_id].price
        # Equal features; onnxruntime's batched rows may differ from single ones in the last
        # bits, and fetches group the candles differently in the two runs.
        assert signal.confidence == pytest.approx(want[signal.signal_id].confidence, abs=1e-6)


@PACKED
async def test_inference_when_a_delivery_is_lost_with_the_connection_then_its_signals_are_made(
    tmp_path: Path, packed: bool
) -> None:
    """Candles the consumer handed out that never reached the worker (the connection died
    with them on the wire) come again only after their ack wait (30 s), after newer ones: the
    window would have moved past them and their signals would be lost. After a lost
    connection the worker reads what is in flight and handles it first."""
    candles = _market(steps=100)
    half = 60 * len(TRIO)
    expected = len(TRIO) * (100 - (WINDOW - 1))
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    server.start()
    bus = await _control(server.url, TRIO)
    inference = start_worker("inference", nats_url=server.url, log_dir=tmp_path)
    try:
        await _publish_all(bus, candles[:half], packed=packed)
        await _until_signals(server.url, len(TRIO) * (60 - (WINDOW - 1)), inference)
        inference.process.send_signal(unix_signal.SIGSTOP)
        await asyncio.sleep(2.0)  # its last pull request (1 s) has expired: none is waiting
        await _publish_all(bus, candles[half : half + 30], packed=packed)
        # Delivered, never received: what the wire lost when the broker went away.
        lost = await _take_without_ack(server.url, 30 // len(TRIO) if packed else 30)
        await bus.close()
        server.stop()
        server.start()
        inference.process.send_signal(unix_signal.SIGCONT)
        bus = Bus(url=server.url, client_name="test-continuity")
        await bus.connect()
        await _publish_all(bus, candles[half + 30 :], packed=packed)
        signals = await _until_signals(server.url, expected, inference, timeout_s=20)
    finally:
        inference.process.send_signal(unix_signal.SIGCONT)
        inference.stop()
        await bus.close()
        server.stop()
    assert lost == candles[half : half + 30]
    made = Counter((s.symbol, s.candle_open_time_ms) for s in signals)
    missing = {(c.symbol, c.open_time_ms) for c in candles[half:]} - set(made)
    assert not missing, f"{len(missing)} candles without their signal"
    assert len(signals) == expected
    assert max(made.values()) == 1


# --- the reads behind it ------------------------------------------------------------------------


async def test_publish_acked_when_the_stream_holds_the_id_then_says_duplicate(
    nats_server: EmbeddedNats, control_pair: Bus
) -> None:
    candle = _candle("BTCUSDT", Decimal("352.4"), minute=0)
    subject = subjects.candle_subject("BTCUSDT")

    first = await control_pair.publish_acked(subject, candle)
    again = await control_pair.publish_acked(subject, candle)

    assert first is not None
    assert again is not None
    assert not first.duplicate
    assert again.duplicate
    assert again.sequence == first.sequence
    assert len(await _candles(nats_server.url)) == 1


async def test_candles_to_warm_when_a_symbol_is_far_back_then_its_last_window_is_found(
    nats_server: EmbeddedNats, control_pair: Bus
) -> None:
    btc = [_candle("BTCUSDT", Decimal(100 + i), minute=i) for i in range(40)]
    eth = [_candle("ETHUSDT", Decimal(200 + i), minute=i) for i in range(300)]
    await _publish_all(control_pair, btc + eth)
    acked = asyncio.Event()

    async def acknowledge(batch: list[Candle]) -> None:
        if batch[-1] == eth[-1]:
            acked.set()

    consuming = asyncio.create_task(
        control_pair.consume_batches(subjects.INFERENCE_CANDLES, Candle, acknowledge)
    )
    try:
        await asyncio.wait_for(acked.wait(), timeout=20)
        await _eventually_acked(control_pair, len(btc) + len(eth))
    finally:
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)

    # ETH's 300 candles stand between BTC's and the ack floor: more than the first look back.
    warmup = await read_warmup(control_pair, subjects.INFERENCE_CANDLES, PAIR, window=WINDOW)

    assert warmup.window == btc[-WINDOW:] + eth[-WINDOW:]
    assert warmup.in_flight == []


async def _eventually_acked(bus: Bus, sequence: int) -> None:
    for _ in range(100):
        position = await bus.consumer_position(subjects.INFERENCE_CANDLES)
        if position.acked_through >= sequence:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the consumer never acknowledged through {sequence}")


async def _take_without_ack(url: str, count: int) -> list[Candle]:
    """Fetch ``count`` messages (candles alone or packs) from inference's durable consumer and
    never acknowledge them; the candles they carry."""
    client = Client()
    await client.connect(url)
    try:
        consumer = subjects.INFERENCE_CANDLES
        js = client.jetstream(timeout=10)
        subscription = await js.pull_subscribe_bind(
            durable=consumer.durable, stream=consumer.stream.name
        )
        messages = await subscription.fetch(count, timeout=5)
        return [candle for m in messages for candle in decode_all(m.data, Candle).messages]
    finally:
        await client.close()


async def test_read_stored_when_the_last_message_is_no_candle_then_the_last_candle_before_it(
    nats_server: EmbeddedNats, control_pair: Bus
) -> None:
    btc = [_candle("BTCUSDT", Decimal(100 + i), minute=i) for i in range(5)]
    await _publish_all(control_pair, btc)
    await publish_raw(
        nats_server.url, subjects.candle_subject("BTCUSDT"), b'{"kind": "candle"', msg_id="poison"
    )

    spans = await read_stored(control_pair, PAIR)

    assert set(spans) == {"BTCUSDT"}  # nothing stored for ETH: it starts fresh
    assert spans["BTCUSDT"].first == btc[0]
    assert spans["BTCUSDT"].last == btc[-1]
