"""``qtrader health``: one table of every workload's and dependency's health, and an exit code.

Targets come from the local stack (``.qtrader/up.json``, written by ``qtrader up``: each role's
``/health`` URL and the stack's NATS server) or from ``--url`` (repeated; a cluster's workload
Services, e.g. through ``kubectl port-forward``). Each workload's ``/health`` gives one row for
the workload and one per dependency it checks; a NATS URL gets its own row from a direct probe.

The exit code is for scripts and CI: 0 when every row is OK, 1 when any is DEGRADED, 2 when any
is CRITICAL. A workload that cannot be reached, or answers with something that is not a health
report, is CRITICAL: silence must never look healthy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from qtrader.health.contract import HealthReport, Status, worst
from qtrader.local.up_state import NoStack, find


@dataclass(frozen=True, kw_only=True)
class Target:
    name: str  # the role for the local stack, else the URL's host:port until /health names it
    url: str  # the /health URL


@dataclass(frozen=True, kw_only=True)
class Row:
    component: str  # "execution", "execution/nats", "nats"
    kind: str  # "workload" or "dependency"
    status: Status
    latency_ms: float | None
    detail: str


def health_url(url: str) -> str:
    """A workload's base URL or its /health URL, as the /health URL."""
    url = url.rstrip("/")
    return url if url.endswith("/health") else url + "/health"


def targets_from_urls(urls: list[str]) -> list[Target]:
    return [Target(name=urlsplit(u).netloc, url=health_url(u)) for u in urls]


def targets_from_stack(directory: Path) -> tuple[list[Target], str]:
    """The local stack's workloads and its NATS URL; NoStack when none runs here."""
    state = find(directory)
    targets = [Target(name=role, url=health_url(url)) for role, url in state.health.items()]
    return targets, state.nats_url


async def workload_rows(client: httpx.AsyncClient, target: Target) -> list[Row]:
    started = time.monotonic()
    try:
        response = await client.get(target.url)
    except httpx.HTTPError as exc:
        detail = f"unreachable at {target.url}: {exc!r}"
        return [_critical(target.name, detail)]
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    if response.status_code != 200:
        return [_critical(target.name, f"HTTP {response.status_code} from {target.url}")]
    try:
        report = HealthReport.model_validate_json(response.content)
    except ValidationError as exc:
        count = exc.error_count()
        return [_critical(target.name, f"not a health report at {target.url} ({count} errors)")]
    name = report.service if target.name == urlsplit(target.url).netloc else target.name
    rows = [
        Row(
            component=name,
            kind="workload",
            status=report.status,
            latency_ms=latency_ms,
            detail=f"{target.url} version {report.version}, up {report.uptime_s:.0f}s",
        )
    ]
    rows += [
        Row(
            component=f"{name}/{dep.name}",
            kind="dependency",
            status=dep.status,
            latency_ms=dep.latency_ms,
            detail=dep.detail,
        )
        for dep in report.dependencies
    ]
    return rows


def _critical(component: str, detail: str) -> Row:
    return Row(
        component=component, kind="workload", status=Status.CRITICAL, latency_ms=None, detail=detail
    )


async def nats_row(url: str, *, timeout_s: float) -> Row:
    """Probe a NATS server directly: a server greets every TCP client with an INFO line."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                greeting = await reader.readline()
            finally:
                writer.close()
                await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        detail = f"unreachable at {host}:{port}: {exc!r}"
        return Row(
            component="nats", kind="dependency", status=Status.CRITICAL, latency_ms=None,
            detail=detail,
        )  # fmt: skip
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    if not greeting.startswith(b"INFO "):
        detail = f"{host}:{port} answered, but not as a NATS server: {greeting[:40]!r}"
        return Row(
            component="nats", kind="dependency", status=Status.CRITICAL, latency_ms=latency_ms,
            detail=detail,
        )  # fmt: skip
    return Row(
        component="nats", kind="dependency", status=Status.OK, latency_ms=latency_ms,
        detail=f"{host}:{port}",
    )  # fmt: skip


async def collect(targets: list[Target], *, nats_url: str | None, timeout_s: float) -> list[Row]:
    """Every target's rows (in the order given), then the NATS row; all probed concurrently."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        per_target = asyncio.gather(*(workload_rows(client, t) for t in targets))
        if nats_url is None:
            results = await per_target
            return [row for rows in results for row in rows]
        results, nats = await asyncio.gather(per_target, nats_row(nats_url, timeout_s=timeout_s))
    return [row for rows in results for row in rows] + [nats]


def overall(rows: list[Row]) -> Status:
    return worst([row.status for row in rows])


def exit_code(rows: list[Row]) -> int:
    """0 all OK, 1 any DEGRADED, 2 any CRITICAL."""
    return overall(rows).severity


def render_table(rows: list[Row]) -> str:
    header = ("COMPONENT", "KIND", "STATUS", "LATENCY", "DETAIL")
    lines = [
        (
            row.component,
            row.kind,
            row.status.value,
            "-" if row.latency_ms is None else f"{row.latency_ms:.1f} ms",
            row.detail,
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(4)]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(cells[:4], widths, strict=True))
        + "  "
        + cells[4]
        for cells in [header, *lines]
    ]
    text.append(f"overall: {overall(rows).value}")
    return "\n".join(line.rstrip() for line in text) + "\n"


def render_json(rows: list[Row]) -> str:
    body = {"status": overall(rows).value, "components": [asdict(row) for row in rows]}
    return json.dumps(body, indent=2) + "\n"


def run_health(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The ``qtrader health`` command (arguments from ``cli._health_command``)."""
    urls: list[str] = args.url
    nats_url: str | None = args.nats_url
    if urls:
        targets = targets_from_urls(urls)
    else:
        try:
            targets, stack_nats = targets_from_stack(Path.cwd())
        except NoStack as exc:
            print(f"qtrader health: {exc}, or pass --url for each workload", file=sys.stderr)
            return Status.CRITICAL.severity  # nothing to vouch for: not healthy
        nats_url = nats_url or stack_nats
    rows = asyncio.run(collect(targets, nats_url=nats_url, timeout_s=args.timeout))
    (out or sys.stdout).write(render_json(rows) if args.json else render_table(rows))
    return exit_code(rows)
