"""``qtrader bench limiter``: what the shared rate limiter costs, and how much budget it uses.

Two measurements, each beside a baseline taken in the same run:

* **Overhead.** ``RateLimiter.acquire`` in a tight loop, with limits so high that nothing ever
  waits: the Redis-shared limiter (one Lua script call per acquisition, against a redis-server the
  benchmark starts on a free port) against the in-process limiter (a sliding log in memory).
  Acquisitions per second, and p50/p99 of one acquisition.
* **Flood.** The local Binance simulator in its own process, with Binance's limits scaled to 1 s
  and 10 s fixed windows (``limiter_flood.SCALED_RULES``), and two flood processes sharing one
  Redis budget (same egress id, same API key) sending mixed requests through the real venue. From
  the simulator's own log and audit: the share of the published weight budget used (the most
  admitted in one window over the limit, and the average over the flood's full windows), the
  requests per second achieved, and every 429 and 418. Baseline: the raw request rate of a single
  unthrottled python-binance client (``GET /fapi/v1/time`` in a loop, limits set very high) on the
  same server, measured first; the server is then reset (empty log, scaled limits again).

Without redis-server on PATH the shared figures are null, the JSON says why under ``redis``, and
the flood runs with in-process limiters (each process keeps half the budget).

Exit 0 when the flood got no 429 and no 418 and no window held more than its limit; 1 otherwise
or when a process failed; 130 when interrupted. The last line of the output is one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from qtrader.exchange.limiter import LimiterConfig, LimiterMode, RateLimiter
from qtrader.exchange.limits import LimitKind, RateLimitRule, RequestCost
from qtrader_tools.benchmarks.harness import (
    BenchFailure,
    percentile,
    report,
    sigterm_as_interrupt,
)
from qtrader_tools.benchmarks.limiter_flood import SCALED_RULES, SIM_KEY, SIM_SECRET, sim_config
from qtrader_tools.benchmarks.limiter_servers import ServerError, run_floods
from qtrader_tools.redis_server import RedisServerError, running_redis
from qtrader_tools.simulators.binance_futures import SimAdmin, SimAdminError
from qtrader_tools.simulators.binance_futures.process import SimProcessError, sim_process

with warnings.catch_warnings():
    # python-binance imports websockets' legacy client, deprecated by websockets >= 14.
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance.client import Client

FLOOD_PROCESSES = 2
REDIS_START_TIMEOUT_S = 30.0
WARMUP = 200  # acquisitions (and baseline requests) before timing: script load, connections
HIGH = 1_000_000_000  # a limit nothing reaches: pure overhead, never a wait
HIGH_RULES = (
    RateLimitRule(LimitKind.REQUEST_WEIGHT, "SECOND", 1, HIGH),
    RateLimitRule(LimitKind.ORDERS, "SECOND", 1, HIGH),
)


# --- overhead -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    count: int
    per_s: float
    p50_ms: float
    p99_ms: float


def _rate(latencies: Sequence[float], elapsed_s: float) -> Rate:
    ordered = sorted(latencies)
    return Rate(
        count=len(ordered),
        per_s=round(len(ordered) / elapsed_s, 1),
        p50_ms=round(percentile(ordered, 50) * 1000, 4),
        p99_ms=round(percentile(ordered, 99) * 1000, 4),
    )


async def acquire_rate(redis_url: str | None, duration_s: float) -> Rate:
    """Acquisitions of weight 1 back to back for ``duration_s``: shared (Redis) or in-process."""
    config = LimiterConfig(
        rules=HIGH_RULES,
        egress_id=f"bench-overhead-{time.time_ns()}",
        account_id="acct:bench-overhead",
        redis_url=redis_url,
    )
    cost = RequestCost(weight=1)
    async with await RateLimiter.create(config) as limiter:
        if redis_url is not None and limiter.mode() is not LimiterMode.SHARED:
            raise BenchFailure(f"the limiter did not reach Redis: {limiter.health().detail}")
        for _ in range(WARMUP):
            await limiter.acquire(cost)
        latencies: list[float] = []
        began = time.perf_counter()
        deadline = began + duration_s
        while (now := time.perf_counter()) < deadline:
            await limiter.acquire(cost)
            latencies.append(time.perf_counter() - now)
        return _rate(latencies, time.perf_counter() - began)


def raw_request_rate(url: str, duration_s: float) -> Rate:
    """One python-binance client, ``GET /fapi/v1/time`` back to back: the server's raw rate."""
    client = Client(SIM_KEY, SIM_SECRET, ping=False, requests_params={"timeout": 5})
    client.FUTURES_URL = f"{url}/fapi"
    try:
        for _ in range(WARMUP):
            client.futures_time()
        latencies: list[float] = []
        began = time.perf_counter()
        deadline = began + duration_s
        while (now := time.perf_counter()) < deadline:
            client.futures_time()
            latencies.append(time.perf_counter() - now)
        return _rate(latencies, time.perf_counter() - began)
    finally:
        client.session.close()


# --- flood figures, from the simulator's log and audit ------------------------------------------


def window_figures(windows: dict[str, Any]) -> dict[str, dict[str, int]]:
    """rule key -> its published limit and the most admitted in one window, fixed and sliding."""
    return {
        rule["key"]: {
            "limit": int(rule["limit"]),
            "max_fixed": int(rule["max_configured"]),
            "max_sliding": int(rule["max_sliding"]),
        }
        for rule in windows["rules"]
    }


def average_weight(log: Sequence[dict[str, Any]], rule: RateLimitRule) -> float:
    """The mean weight admitted per fixed window, over the flood's full windows.

    The first and last windows are partial (the flood started and ended inside them), so they
    are left out when there are others; windows with nothing admitted count as 0.
    """
    charged = [e for e in log if e["admitted"] and e["weight"] > 0]
    if not charged:
        return 0.0
    per_window: dict[int, int] = {}
    for entry in charged:
        index = entry["t_ms"] // rule.window_ms
        per_window[index] = per_window.get(index, 0) + entry["weight"]
    first, last = min(per_window), max(per_window)
    indexes = range(first + 1, last) if last - first >= 2 else range(first, last + 1)
    return statistics.fmean(per_window.get(i, 0) for i in indexes)


def flood_figures(
    log: Sequence[dict[str, Any]], windows: dict[str, Any], summaries: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    weight_rule = next(r for r in SCALED_RULES if r.kind is LimitKind.REQUEST_WEIGHT)
    by_rule = window_figures(windows)
    weight = by_rule[weight_rule.key]
    span_s = (max(e["t_ms"] for e in log) - min(e["t_ms"] for e in log)) / 1000 if log else 0.0
    errors: dict[str, int] = {}
    for summary in summaries:
        for name, count in summary["errors"].items():
            errors[name] = errors.get(name, 0) + count
    return {
        "flood_processes": len(summaries),
        "flood_requests": len(log),
        "flood_s": round(span_s, 2),
        "flood_requests_per_s": round(len(log) / span_s, 1) if span_s > 0 else None,
        "flood_limiter_modes": [s["limiter_mode"] for s in summaries],
        # Seconds each flood spent in acquire(): its Redis calls, and waiting for room.
        "flood_acquire_s": [s["limiter_acquire_s"] for s in summaries],
        "flood_errors": errors,
        "weight_rule": weight_rule.key,
        "weight_limit": weight["limit"],
        "weight_share_max": round(weight["max_fixed"] / weight["limit"], 4),
        "weight_share_max_sliding": round(weight["max_sliding"] / weight["limit"], 4),
        "weight_share_avg": round(average_weight(log, weight_rule) / weight["limit"], 4),
        "windows": by_rule,
        "status_429": sum(1 for e in log if e["status"] == 429),
        "status_418": sum(1 for e in log if e["status"] == 418),
    }


# --- the run ------------------------------------------------------------------------------------


def _progress(began: float, text: str) -> None:
    elapsed = time.monotonic() - began
    print(f"qtrader bench limiter: [{elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)


def measure(*, requests: int, duration_s: float, work_dir: Path) -> dict[str, Any]:
    """Every figure, with the servers and processes it needs started and stopped here."""
    began = time.monotonic()
    binary = shutil.which("redis-server")
    with contextlib.ExitStack() as stack:
        redis_url: str | None = None
        if binary is None:
            redis = "unavailable: redis-server is not on PATH (apt-get install redis-server)"
            _progress(began, f"{redis}; shared figures will be null")
        else:
            redis_url = stack.enter_context(
                running_redis(work_dir, binary=Path(binary), timeout_s=REDIS_START_TIMEOUT_S)
            ).url
            redis = f"redis-server at {redis_url}"
        local = asyncio.run(acquire_rate(None, duration_s))
        shared = asyncio.run(acquire_rate(redis_url, duration_s)) if redis_url else None
        _progress(began, "acquire overhead measured; starting the simulator")
        url = stack.enter_context(sim_process(sim_config(), work_dir))
        admin = stack.enter_context(SimAdmin(url))
        admin.config(rate_limits=[rule.as_binance() for rule in HIGH_RULES])
        raw = raw_request_rate(url, duration_s)
        admin.reset()  # the start-up config again (scaled limits), and an empty log
        _progress(began, f"raw rate measured; {FLOOD_PROCESSES} floods of {requests} requests")
        summaries = run_floods(
            url,
            redis_url,
            requests=requests,
            seeds=range(1, FLOOD_PROCESSES + 1),
            work_dir=work_dir,
            timeout_s=60 + requests / 20,
        )
        flood = flood_figures(admin.log(), admin.windows(), summaries)
    return {
        "benchmark": "limiter",
        "redis": redis,
        **_rate_fields("acquire_shared", shared),
        **_rate_fields("acquire_local", local),
        "acquire_shared_vs_local_p50": (
            round(shared.p50_ms / local.p50_ms, 1) if shared and local.p50_ms > 0 else None
        ),
        **flood,
        **_rate_fields("raw", raw),
        "flood_vs_raw": (
            round(flood["flood_requests_per_s"] / raw.per_s, 3)
            if flood["flood_requests_per_s"]
            else None
        ),
        "requests_per_process": requests,
        "duration_s": duration_s,
        "wall_s": round(time.monotonic() - began, 1),
    }


def _rate_fields(prefix: str, rate: Rate | None) -> dict[str, Any]:
    return {
        f"{prefix}_per_s": rate.per_s if rate else None,
        f"{prefix}_p50_ms": rate.p50_ms if rate else None,
        f"{prefix}_p99_ms": rate.p99_ms if rate else None,
        f"{prefix}_count": rate.count if rate else None,
    }


# --- the report ---------------------------------------------------------------------------------


def _rate_row(result: dict[str, Any], prefix: str) -> str:
    if result[f"{prefix}_per_s"] is None:
        return "n/a"
    return (
        f"{result[f'{prefix}_per_s']:>10,.0f}/s  p50 {result[f'{prefix}_p50_ms']:.3f} ms  "
        f"p99 {result[f'{prefix}_p99_ms']:.3f} ms"
    )


def render(result: dict[str, Any]) -> str:
    """The human-readable table."""
    n = result["flood_processes"]
    modes = ", ".join(result["flood_limiter_modes"])
    ratio = result["acquire_shared_vs_local_p50"]
    rows = [
        ("redis", result["redis"]),
        ("acquire, shared (Redis)", _rate_row(result, "acquire_shared")),
        ("  baseline: in-process", _rate_row(result, "acquire_local")),
        ("  shared / in-process p50", f"{ratio:.1f}x" if ratio is not None else "n/a"),
        (
            "flood",
            f"{result['flood_requests']:,} requests from {n} processes in "
            f"{result['flood_s']:.1f} s (limiter mode: {modes})",
        ),
        ("  requests/s", f"{result['flood_requests_per_s'] or 0:,.0f}/s"),
        (
            "  time in acquire()",
            ", ".join(f"{s:.1f} s" for s in result["flood_acquire_s"]) + " (per process)",
        ),
        ("  baseline: 1 raw client", _rate_row(result, "raw")),
        ("  flood / raw", f"{result['flood_vs_raw'] or 0:.2f}"),
        (
            f"weight budget {result['weight_rule']}",
            f"max {result['weight_share_max']:.1%} of {result['weight_limit']} in a fixed window "
            f"({result['weight_share_max_sliding']:.1%} sliding), "
            f"average {result['weight_share_avg']:.1%}",
        ),
        *(
            (
                f"  {key}",
                f"max {w['max_fixed']} fixed, {w['max_sliding']} sliding, limit {w['limit']}",
            )
            for key, w in result["windows"].items()
        ),
        ("429s / 418s", f"{result['status_429']} / {result['status_418']}"),
        ("client errors", json.dumps(result["flood_errors"]) if result["flood_errors"] else "none"),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    title = "limiter: rate limiter overhead, and a two-process flood against the local simulator"
    width = max(len(label) for label, _ in rows)
    return "\n".join([title, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def verdict(result: dict[str, Any]) -> str | None:
    """Why the run fails, or None."""
    if result["status_429"] or result["status_418"]:
        return f"the flood got {result['status_429']} 429(s) and {result['status_418']} 418(s)"
    over = [k for k, w in result["windows"].items() if w["max_fixed"] > w["limit"]]
    if over:
        return f"a window held more than its limit: {', '.join(over)}"
    return None


def run(
    *, requests: int, duration_s: float, json_path: Path | None = None, out: TextIO = sys.stdout
) -> int:
    """Run the benchmark, print the table and the JSON line; the exit code of ``qtrader bench``."""
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped on the way out.
    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="qtrader-bench-", ignore_cleanup_errors=True) as d:
            result = measure(requests=requests, duration_s=duration_s, work_dir=Path(d))
    except (BenchFailure, ServerError, RedisServerError, SimProcessError, SimAdminError) as exc:
        print(f"qtrader bench limiter: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qtrader bench limiter: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return report("limiter", result, render=render, verdict=verdict, json_path=json_path, out=out)
