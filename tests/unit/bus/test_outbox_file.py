"""The disk outbox: order, durability across reopening, the bound, removal by sequence."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtrader.bus.outbox import Outbox, OutboxFull, open_outbox


def test_entries_come_back_oldest_first_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    outbox = Outbox(path)
    for n in range(5):
        outbox.append("qt.x", f"id-{n}", f"payload-{n}".encode())
    outbox.close()  # as a process that died would leave it

    reopened = Outbox(path)
    assert len(reopened) == 5
    entries = reopened.oldest(3)
    assert [e.msg_id for e in entries] == ["id-0", "id-1", "id-2"]
    assert entries[0].payload == b"payload-0"
    reopened.remove(entries[0].seq)
    reopened.remove(entries[0].seq)  # removing twice removes once
    assert [e.msg_id for e in reopened.oldest(10)] == ["id-1", "id-2", "id-3", "id-4"]
    assert len(reopened) == 4
    reopened.close()


def test_a_full_outbox_refuses_and_writes_nothing(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "w.db", capacity=2)
    outbox.append("s", "a", b"1")
    outbox.append("s", "b", b"2")
    assert outbox.full
    with pytest.raises(OutboxFull, match="capacity"):
        outbox.append("s", "c", b"3")
    assert [e.msg_id for e in outbox.oldest(10)] == ["a", "b"]
    outbox.remove(outbox.oldest(1)[0].seq)
    outbox.append("s", "c", b"3")  # room again after a removal
    assert [e.msg_id for e in outbox.oldest(10)] == ["b", "c"]
    outbox.close()


def test_age_of_the_oldest_entry(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "w.db")
    assert outbox.oldest_age_s() == 0.0
    outbox.append("s", "a", b"1")
    assert 0.0 <= outbox.oldest_age_s() < 60
    outbox.close()
    assert outbox.oldest_age_s() == 0.0  # a metrics scrape after close does not fail


def test_capacity_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capacity"):
        Outbox(tmp_path / "w.db", capacity=0)


def test_a_restarted_worker_reopens_its_file_a_concurrent_one_gets_its_own(
    tmp_path: Path,
) -> None:
    first = open_outbox(tmp_path, "execution-pod-a")
    first.append("s", "left-behind", b"1")
    concurrent = open_outbox(tmp_path, "execution-pod-a")  # the same name, still held
    assert concurrent.path != first.path
    assert len(concurrent) == 0
    concurrent.close()
    first.close()  # the process ends

    restarted = open_outbox(tmp_path, "execution-pod-a")
    assert restarted.path == first.path
    assert [e.msg_id for e in restarted.oldest(10)] == ["left-behind"]
    restarted.close()
