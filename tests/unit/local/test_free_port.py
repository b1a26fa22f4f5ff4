"""``free_port`` hands out ports below the kernel's ephemeral range, where no outgoing
connection can take one between the choice and the server's bind, and skips a port in use."""

from __future__ import annotations

import socket
from pathlib import Path

from qtrader.local.nats_server import free_port


def _ephemeral_first() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_are_below_the_ephemeral_range_and_distinct() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < _ephemeral_first() for port in ports), ports


def test_a_port_in_use_is_skipped() -> None:
    first = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", first + 1))  # the next one on this process's walk
        taken.listen()
        port = free_port()
    assert port != first + 1
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # free indeed
