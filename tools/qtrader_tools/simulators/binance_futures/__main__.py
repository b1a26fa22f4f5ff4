"""``python -m qtrader_tools.simulators.binance_futures [--host H] [--port P] [--config FILE]``.

Prints exactly one line, ``listening on http://HOST:PORT``, once the port is bound (so a parent
process can read the URL, with ``--port 0`` for any free port), then serves until SIGTERM or
SIGINT and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
from pathlib import Path

from .config import ConfigError, SimConfig
from .server import BinanceFuturesSim


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config = _config(parser, args.config)
    return asyncio.run(_serve(config, args.host, args.port))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qtrader_tools.simulators.binance_futures",
        description="A local Binance USD-M futures REST simulator with an admin API under /_sim/.",
    )
    parser.add_argument("--host", default="127.0.0.1", type=_host, help="IP to bind (127.0.0.1)")
    parser.add_argument("--port", default=0, type=_port, help="port to bind; 0 picks a free one")
    parser.add_argument("--config", type=Path, help="JSON file of SimConfig fields")
    return parser


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}") from None
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {port}")
    return port


def _config(parser: argparse.ArgumentParser, path: Path | None) -> SimConfig:
    if path is None:
        return SimConfig()
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        parser.error(f"--config: cannot read {path}: {exc.strerror}")
    except json.JSONDecodeError as exc:
        parser.error(f"--config: {path} is not JSON: {exc}")
    try:
        return SimConfig.from_dict(raw)
    except ConfigError as exc:
        parser.error(f"--config: {path}: {exc}")


async def _serve(config: SimConfig, host: str, port: int) -> int:
    sim = BinanceFuturesSim(config)
    try:
        url = await sim.start(host, port)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
