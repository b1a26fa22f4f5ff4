"""A full or failing outbox disk pushes back, says so by name in /health, and kills nothing.

The disks are real: a 1 MiB tmpfs that the outbox fills during a NATS outage, and files made
immutable (``chattr +i``) so that SQLite's writes fail while the outbox replays. Both need root
(CI runs as root); elsewhere these tests skip and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_outbox import POLICY, _published, candle

from qtrader.bus.nats_bus import Bus
from qtrader.bus.outbox import Outbox
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle
from qtrader.health.contract import Status
from qtrader.local.control import publish_policy
from qtrader.local.nats_server import EmbeddedNats
from support.streams import read_all
from support.workers import Worker, eventually, start_worker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 and not os.environ.get("CI"),
        reason="mounting a tmpfs and chattr need root (CI runs as root)",
    ),
]

CANDLES_PER_SYMBOL = 3000  # about 2.4 MB of outbox for two symbols: more than the disk holds


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    existing = [str(p) for p in paths if p.exists()]
    subprocess.run(["chattr", "+i", *existing], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *existing], check=False)


def _outbox(worker: Worker) -> tuple[object, str]:
    outbox = worker.dependency("outbox")
    return outbox.get("status"), str(outbox.get("detail"))


async def test_marketdata_fills_its_outbox_disk_waits_and_loses_nothing(
    nats_server: EmbeddedNats, tmp_path: Path, small_disk: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await bus.close()
    args = (
        "--seed", "5", "--candles-per-second", "300",
        "--max-candles", str(CANDLES_PER_SYMBOL), "--outbox-dir", str(small_disk),
    )  # fmt: skip
    marketdata = start_worker("marketdata", nats_url=url, log_dir=tmp_path, args=args)
    try:
        await eventually(
            lambda: _published(marketdata) >= 40, timeout_s=20, what="40 candles", worker=marketdata
        )
        await asyncio.to_thread(nats_server.stop)
        await eventually(
            lambda: _outbox(marketdata)[0] == "CRITICAL",
            timeout_s=60,
            what="the outbox's disk to fill",
            worker=marketdata,
        )
        assert str(small_disk) in _outbox(marketdata)[1]
        assert "disk is full" in _outbox(marketdata)[1]
        held = _published(marketdata)
        await asyncio.sleep(2.0)  # producing stopped, the process lives
        assert marketdata.process.poll() is None
        assert _published(marketdata) == held
        await asyncio.to_thread(nats_server.start)
        await eventually(
            lambda: "ended" in str(marketdata.health()) and _outbox(marketdata)[0] == "OK",
            timeout_s=120,
            what="the outbox to drain and the feed to end",
            worker=marketdata,
        )
        assert marketdata.process.poll() is None
    finally:
        marketdata.stop()
    stored = await read_all(
        url, stream="QT_MARKET", subject="qtrader.market.candle.*", message_type=Candle
    )
    for symbol in POLICY.spec.symbols:
        times = [c.open_time_ms for c in stored if c.symbol == symbol]
        assert len(times) == CANDLES_PER_SYMBOL, symbol
        assert times == sorted(set(times)), f"{symbol}: out of order or repeated"


async def test_an_entry_replayed_but_not_removable_is_kept_and_sent_once(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    path = tmp_path / "outbox" / "producer.db"
    bus = Bus(
        url=nats_server.url,
        client_name="producer",
        outbox=Outbox(path, capacity=1000),
        publish_timeout_s=0.5,
    )
    await bus.connect()
    await bus.ensure_topology()
    await asyncio.to_thread(nats_server.stop)
    replaying: asyncio.Task[None] | None = None
    try:
        for index in range(50):
            assert await bus.publish(subjects.candle_subject("BTCUSDT"), candle(index)) is None
        # Not the -shm file: SQLite maps it into memory, and a write to a mapping of an immutable
        # file is a SIGBUS (no disk fault takes away pages a process already has).
        with immutable(path, path.with_name(path.name + "-wal")):
            await asyncio.to_thread(nats_server.start)
            replaying = asyncio.create_task(bus.replay_forever())
            await eventually(
                lambda: bus.outbox_health().status is Status.CRITICAL,
                timeout_s=20,
                what="the failed removal to be reported",
            )
            assert str(path) in bus.outbox_health().detail
            assert bus.outbox_depth() == 50  # sent, but kept: nothing is lost if we die now
        await eventually(
            lambda: bus.outbox_depth() == 0 and bus.outbox_health().status is Status.OK,
            timeout_s=20,
            what="the outbox to drain once the disk recovered",
        )
    finally:
        if replaying is not None:
            replaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replaying
        await bus.close()
    stored = await read_all(
        nats_server.url,
        stream="QT_MARKET",
        subject="qtrader.market.candle.*",
        message_type=Candle,
    )
    indexes = [(c.open_time_ms - candle(0).open_time_ms) // 60_000 for c in stored]
    assert indexes == list(range(50))  # each once (the duplicate window), in order


async def test_a_worker_whose_outbox_cannot_be_opened_runs_and_says_critical(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    unwritable = tmp_path / "read-only"
    unwritable.mkdir()
    with immutable(unwritable):
        portfolio = start_worker(
            "portfolio",
            nats_url=nats_server.url,
            log_dir=tmp_path,
            args=("--outbox-dir", str(unwritable)),
        )
        try:
            await eventually(
                lambda: _outbox(portfolio)[0] == "CRITICAL",
                timeout_s=20,
                what="the outbox reported",
                worker=portfolio,
            )
            assert str(unwritable) in _outbox(portfolio)[1]
            assert portfolio.get("/readyz").status_code == 503
            assert portfolio.process.poll() is None
        finally:
            portfolio.stop()
