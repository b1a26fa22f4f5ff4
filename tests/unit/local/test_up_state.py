"""``.qtrader/up.json``: how ``qtrader ess`` and ``qtrader policy`` find the running stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtrader.local import up_state


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _state(pid: int, url: str = "nats://127.0.0.1:1") -> up_state.UpState:
    return up_state.UpState(nats_url=url, pid=pid, ess="main", health={"execution": "http://x"})


def test_find_when_no_file_then_says_to_start_a_stack(tmp_path: Path) -> None:
    with pytest.raises(up_state.NoStack, match="no local stack is running here"):
        up_state.find(tmp_path)


def test_find_when_claimed_by_a_live_process_then_returns_its_state(tmp_path: Path) -> None:
    assert up_state.claim(_state(os.getpid()), tmp_path) is None
    assert up_state.find(tmp_path) == _state(os.getpid())


def test_find_when_the_writer_is_gone_then_says_it_is_not_running(tmp_path: Path) -> None:
    up_state.claim(_state(_dead_pid()), tmp_path)
    with pytest.raises(up_state.NoStack, match="is not running any more"):
        up_state.find(tmp_path)


def test_claim_when_a_live_stack_owns_the_file_then_leaves_it_and_names_it(
    tmp_path: Path,
) -> None:
    up_state.claim(_state(os.getpid(), "nats://127.0.0.1:2"), tmp_path)
    other = up_state.claim(_state(os.getpid() + 100_000, "nats://127.0.0.1:3"), tmp_path)
    assert other is not None
    assert other.nats_url == "nats://127.0.0.1:2"
    assert up_state.find(tmp_path).nats_url == "nats://127.0.0.1:2"


def test_claim_when_the_file_is_stale_then_takes_it_over(tmp_path: Path) -> None:
    up_state.claim(_state(_dead_pid()), tmp_path)
    assert up_state.claim(_state(os.getpid(), "nats://127.0.0.1:4"), tmp_path) is None
    assert up_state.find(tmp_path).nats_url == "nats://127.0.0.1:4"


def test_release_removes_only_its_own_file(tmp_path: Path) -> None:
    up_state.claim(_state(os.getpid()), tmp_path)
    up_state.release(tmp_path, pid=os.getpid() + 1)
    assert (tmp_path / up_state.STATE_FILE).exists()
    up_state.release(tmp_path, pid=os.getpid())
    assert not (tmp_path / up_state.STATE_FILE).exists()
