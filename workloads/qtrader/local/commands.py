"""``qtrader ess`` and ``qtrader policy``: talk to the running local stack, print the answer.

They reach the stack's NATS server through ``.qtrader/up.json`` (``qtrader.local.up_state``) or
``--nats-url``. Exit codes: 0 done; 1 no stack, no answer in time, or a refused reset; 2 bad input
(an invalid patch or policy file), and then nothing was changed; 3 tripped, but a worker the
control plane knows did not acknowledge the halt within ``ackTimeoutSeconds`` (it is listed as
pending; a frozen worker stays pending until it answers or its 60 s lease lapses). What happens
to the kill switch is decided by the control plane inside ``qtrader up``
(``qtrader.local.control_plane``); these commands only patch the spec
(``qtrader.local.ess_client``) and report the status it writes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import HaltLatch, MessageRejected, PolicyRevision, Undecodable
from qtrader.contracts.policy import (
    API_GROUP,
    API_VERSION,
    PolicyError,
    TradingPolicy,
    load_policy_file,
)
from qtrader.control.ess_resource import EmergencyStopError
from qtrader.control.ess_status import EssMode, format_time
from qtrader.exchange.listing import VenueListings
from qtrader.local import ess_client, up_state
from qtrader.local.control import publish_policy
from qtrader.local.control_plane import EssRecord
from qtrader.local.ess_client import EssNotFound, Outcome, Verdict

CONNECT_TIMEOUT_S = 3.0

Action = Callable[[Bus], Awaitable[int]]


NOT_ACKNOWLEDGED = 3  # exit code: tripped, but a known worker has not acknowledged the halt
ACK_GRACE_S = 2.0


class _Usage(Exception):
    """Bad input found after connecting (exit 2); nothing was changed."""


def run_ess(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    command = f"qtrader ess {args.ess_command}"
    try:
        stack = _locate(args)
    except up_state.NoStack as exc:
        return _fail(command, str(exc), code=1)
    name = args.name or (stack.ess if stack else "main")
    url = args.nats_url or (stack.nats_url if stack else "")
    actions: dict[str, Action] = {
        "trip": lambda bus: _trip(bus, name=name, args=args, out=out),
        "reset": lambda bus: _reset(bus, name=name, wait_s=args.wait, out=out),
        "status": lambda bus: _status(bus, name=name, as_json=args.json, out=out),
    }
    return asyncio.run(_connected(url, actions[args.ess_command], command=command))


def run_policy(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    command = f"qtrader policy {args.policy_command}"
    action: Action = functools.partial(_show_policy, out=out)
    if args.policy_command == "apply":
        try:
            # bad input first, before anything is touched
            policy = load_policy_file(args.file, listings=VenueListings(args.exchange_url))
        except PolicyError as exc:
            return _fail(command, str(exc), code=2)
        action = functools.partial(_apply_policy, policy=policy, out=out)
    try:
        stack = _locate(args)
    except up_state.NoStack as exc:
        return _fail(command, str(exc), code=1)
    url = args.nats_url or (stack.nats_url if stack else "")
    return asyncio.run(_connected(url, action, command=command))


def _locate(args: argparse.Namespace) -> up_state.UpState | None:
    """The stack of the current directory, or None when --nats-url says where to go."""
    return None if args.nats_url else up_state.find(Path.cwd())


def _fail(command: str, message: str, *, code: int) -> int:
    print(f"{command}: {message}", file=sys.stderr)
    return code


async def _connected(url: str, action: Action, *, command: str) -> int:
    """Run ``action`` on a connection to ``url``; errors become a message and an exit code."""
    logging.getLogger("qtrader.bus").setLevel(logging.ERROR)  # no retry chatter on a CLI
    bus = Bus(url=url, client_name=f"{command.replace(' ', '-')}:{_user()}")
    try:  # closed on every path: a connect cut short by the timeout may have half a connection
        try:
            await asyncio.wait_for(bus.connect(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            return _fail(command, f"cannot reach the stack's NATS server at {url}", code=1)
        return await action(bus)
    except (_Usage, EmergencyStopError) as exc:
        return _fail(command, str(exc), code=2)
    except (EssNotFound, BusUnavailable, MessageRejected) as exc:
        return _fail(command, str(exc), code=1)
    except Exception as exc:  # e.g. a NATS server without the stack's buckets: say so, briefly
        hint = f"is {url} the NATS server of a `qtrader up`?"
        return _fail(command, f"{type(exc).__name__}: {exc} ({hint})", code=1)
    finally:
        await bus.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment or the password database
        return "unknown"


# --- ess -------------------------------------------------------------------------------------


async def _trip(bus: Bus, *, name: str, args: argparse.Namespace, out: TextIO) -> int:
    outcome = await ess_client.trip(
        bus,
        name=name,
        reason=args.reason,
        mode=EssMode(args.mode) if args.mode else None,
        tripped_by=f"cli:{_user()}",
        timeout_s=args.wait,
    )
    return await _report(bus, outcome, name=name, out=out)


async def _reset(bus: Bus, *, name: str, wait_s: float, out: TextIO) -> int:
    outcome = await ess_client.reset(bus, name=name, timeout_s=wait_s)
    return await _report(bus, outcome, name=name, out=out)


async def _report(bus: Bus, outcome: Outcome, *, name: str, out: TextIO) -> int:
    for event in outcome.events:
        out.write(f"{event['type']} {event['reason']}: {event['message']}\n")
    verdict = outcome.verdict
    record = outcome.record
    if verdict is Verdict.NOT_OBSERVED:
        out.write(
            f"the control plane has not answered yet; the spec is patched (generation "
            f"{record.generation}) and applies when it does. Is `qtrader up` running?\n"
        )
    elif verdict is Verdict.NOTHING_TO_DO:
        out.write(f"EmergencyStop {name} is not tripped: nothing to reset\n")
    elif verdict is Verdict.OVERRIDDEN:
        out.write("the spec was changed again by someone else meanwhile\n")
    if verdict in (Verdict.TRIPPED, Verdict.RESET):
        # The control plane judges overdue at ackTimeoutSeconds after its latch write: wait a
        # little longer than that, so its AckTimeout report is what the command shows.
        timeout_s = record.spec.ack_timeout_seconds + ACK_GRACE_S
        record = await ess_client.wait_for_acks(bus, name=name, timeout_s=timeout_s)
    _print_summary(record, out, events=False)  # the new ones are printed above
    if not verdict.succeeded:
        return 1
    if verdict is Verdict.TRIPPED and record.list_in_status("pendingWorkers"):
        out.write(
            f"ack: {', '.join(record.list_in_status('pendingWorkers'))} did not acknowledge"
            f" the halt within {record.spec.ack_timeout_seconds}s; it is pending until it does"
            " (the halt is in force for every worker that reads the latch)\n"
        )
        return NOT_ACKNOWLEDGED
    return 0


async def _status(bus: Bus, *, name: str, as_json: bool, out: TextIO) -> int:
    record = await ess_client.read_record(bus, name)
    if as_json:
        out.write(json.dumps(record.to_resource(), indent=2) + "\n")
        return 0
    latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    _print_summary(record, out, latch=latch)
    return 1 if isinstance(latch, Undecodable) else 0


def _print_summary(
    record: EssRecord,
    out: TextIO,
    *,
    latch: HaltLatch | Undecodable | None = None,
    events: bool = True,
) -> None:
    lines = _summary_lines(record, latch=latch)
    if events:
        lines += [
            f"  event       {e['at']} {e['reason']}: {e['message']}"
            for e in record.list_in_status("events")[-5:]
        ]
    out.write("\n".join(lines) + "\n")


def _summary_lines(record: EssRecord, *, latch: HaltLatch | Undecodable | None) -> list[str]:
    status, spec = record.ess_status(), record.spec
    lines = [f"EmergencyStop {record.name}: {status.state}"]
    wanted = f"tripped ({spec.mode}): {spec.reason}" if spec.tripped else "not tripped"
    lines.append(
        f"  spec        {wanted}; cooldown {spec.cooldown_seconds}s, "
        f"{'manual reset' if spec.require_manual_reset else 'automatic reset allowed'}, "
        f"generation {record.generation} (observed {record.observed_generation})"
    )
    if status.tripped_at is not None:
        lines.append(
            f"  last trip   {format_time(status.tripped_at)} by {status.tripped_by}"
            + (f": {status.reason}" if status.reason else "")
        )
    if status.cooldown_until is not None:
        lines.append(f"  cooldown    until {format_time(status.cooldown_until)}")
    if status.reset_refused_until is not None:
        lines.append(f"  reset       refused until {format_time(status.reset_refused_until)}")
    lines.append(f"  counts      trips {status.trip_count}, resets {status.reset_count}")
    if isinstance(latch, Undecodable):  # the workers are halted by it
        in_bucket = f"; in the bucket: {latch} (workers halted)"
    else:
        in_bucket = f"; in the bucket: revision {latch.revision} {latch.state}" if latch else ""
    lines.append(f"  latch       revision {status.latch_revision} {status.latch}{in_bucket}")
    return lines + _positions_lines(record) + _ack_lines(record)


def _positions_lines(record: EssRecord) -> list[str]:
    """The ``PositionsOpen`` condition as the control plane last wrote it."""
    for condition in record.list_in_status("conditions"):
        if condition.get("type") == "PositionsOpen":
            return [f"  positions   {condition.get('reason')}: {condition.get('message')}"]
    return []


def _ack_lines(record: EssRecord) -> list[str]:
    acks = record.list_in_status("acknowledgements")
    lines = [
        f"  ack         {a['worker']} revision {a['revision']} {a['state']} at {a['at']}"
        f" ({a['openOrdersCancelled']} open orders cancelled)"
        for a in acks
    ] or ["  ack         no execution worker known"]
    pending = record.list_in_status("pendingWorkers")
    if pending:
        revision = record.ess_status().latch_revision
        lines.append(f"  pending     {', '.join(pending)} (latch revision {revision} not acked)")
    return lines


# --- policy ----------------------------------------------------------------------------------


async def _apply_policy(bus: Bus, *, policy: TradingPolicy, out: TextIO) -> int:
    ref = policy.spec.emergency_stop_ref
    stop = await bus.kv_get(subjects.ESS_BUCKET, ref, EssRecord)
    if stop is None:
        raise _Usage(f"spec.emergencyStopRef: no EmergencyStop named {ref!r} in this stack")
    if isinstance(stop, Undecodable):
        raise stop.rejected()
    revision = await publish_policy(bus, policy)
    out.write(
        f"policy {revision.name} revision {revision.revision} published; "
        "the workloads apply it live\n"
    )
    return 0


async def _show_policy(bus: Bus, *, out: TextIO) -> int:
    revision = await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    if revision is None:
        out.write("no policy published\n")
        return 1
    if isinstance(revision, Undecodable):
        raise revision.rejected()  # the workloads keep their last good revision; say so
    published = format_time(datetime.fromtimestamp(revision.published_at_ms / 1000, tz=UTC))
    document: dict[str, Any] = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TradingPolicy",
        "metadata": {"name": revision.name},
        "spec": revision.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    out.write(f"# revision {revision.revision}, published {published}\n")
    out.write(yaml.safe_dump(document, sort_keys=False))
    return 0
