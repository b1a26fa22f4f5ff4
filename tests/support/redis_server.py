"""A real ``redis-server`` for tests (``qtrader_tools.redis_server``), skipped or failed if absent.

``require_redis_server()`` skips a test when the binary is missing on a developer's machine, but
fails it when ``CI`` is set: CI must never pass by silently skipping the Redis tests (install the
Debian package ``redis-server``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qtrader_tools import redis_server
from qtrader_tools.redis_server import EmbeddedRedis, RedisServerError

__all__ = ["EmbeddedRedis", "in_ci", "require_redis_server", "running_redis"]

_NOT_CI = {"", "0", "false", "no"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in _NOT_CI


def require_redis_server() -> Path:
    """The redis-server binary; skip the test without one, unless in CI, where it fails."""
    try:
        return redis_server.redis_server_binary()
    except RedisServerError as exc:
        if in_ci():
            pytest.fail(f"{exc}; CI is set, so the Redis tests must not be skipped")
        pytest.skip(str(exc))


@contextmanager
def running_redis(work_dir: Path, *, port: int | None = None) -> Iterator[EmbeddedRedis]:
    """A started redis-server, stopped on exit; skips/fails like ``require_redis_server``."""
    binary = require_redis_server()
    with redis_server.running_redis(work_dir, binary=binary, port=port) as server:
        yield server
