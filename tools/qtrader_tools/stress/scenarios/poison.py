"""Poison: bad messages on every subject and bad values in every KV key a workload reads, while
the pipeline trades; nothing dies, every poison is counted and ends, the latch fails closed.

What runs: the pipeline of ``broker_outage`` (nats-server and the four workloads as real
processes in paper mode), kept up by the supervisor (``Rig.supervise``), so a worker that died on
poison would be restarted and counted rather than end the run. Once orders fill:

1. the whole catalogue of ``qtrader_tools.stress.poison`` (``published_poison``: not JSON, deeply
   nested JSON, bytes that are not UTF-8, the wrong kind, a wrong or NaN schema_version, each
   Decimal as ``1e999``/``NaN``/``Infinity``/``1e-999``, timestamps past year 9999, a payload
   over the size cap) is published raw, ``copies`` times, on every subject the workloads
   consume, JetStream and core NATS alike;
2. every bad value of ``bad_values`` is written, one after the other, to the policy key: each
   must be refused by every workload (``qtrader_policy_refused_total``) with the last good
   policy kept in force (``/health`` policy DEGRADED; orders go on);
3. every bad value is written to the halt latch key, one after the other: each must be refused
   by execution (``qtrader_halt_latch_refused_total``), which fails closed (HALTED,
   ``/health`` halt-latch CRITICAL), and is held there ``hold_s`` while signals keep coming;
4. a good latch and a good policy are written back: trading resumes. Then the feed is stopped
   (SIGTERM), the pipeline drains and every stream is read back.

Criteria, and why each:

* ``supervisor restarts == 0``: no process died on anything it read.
* ``consumers that did not count their poison exactly == 0``: every consumer of every workload
  (``CONSUMERS``: the ``consumer`` label of ``qtrader_messages_rejected_total``, scraped from
  its ``/metrics``, summed over the reasons) counted exactly the poison published on its
  subjects: one dropped unseen, or one redelivered and counted twice, would show.
* ``handler errors == 0`` and ``consumer messages unsettled == 0``: poison was refused at
  decoding and settled; none reached a handler, none is pending, waiting for an ack or being
  redelivered on the durable consumers (``num_pending``, ``num_ack_pending``,
  ``num_redelivered``) once the pipeline drained: not redelivered forever.
* ``policy values not refused by every workload == 0`` and ``workloads that kept the last
  good policy == 4`` (DEGRADED naming the refusal, revision unchanged).
* ``latch values not refused == 0``, ``seconds from a bad latch to HALTED <= LATCH_REFUSAL_S``
  and ``orders sent while execution held a refused latch == 0``: fail closed, and stay closed
  the whole ``hold_s``; ``signals denied while halted > 0`` proves signals kept arriving.
* ``orders filled after the good latch and policy > 0``: trading resumed (from FILLS).
* ``messages derived from the poison == 0``: no candle, signal, intent, update or fill in the
  streams carries a sample message's ids or times.
* ``workers whose /health recovered == 4`` after the good writes, and the common criteria of
  ``broker_outage.judge_pipeline`` (nothing lost, duplicated or out of order, nothing without
  its cause, the exact account of FILLS, exposure).

Length: ``copies`` is 10 at full length (``--scale 1``), 1 at the default 0.1; ``hold_s`` 30 s at
full length, ``MIN_HOLD_S`` at the default.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from qtrader.contracts import subjects
from qtrader.contracts.messages import Message, TradingState
from qtrader.local.control import write_latch
from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import ISSUER, Rig, ScenarioFailure
from qtrader_tools.stress.poison import (
    SAMPLE_SYMBOL,
    T0,
    bad_values,
    published_poison,
    sample_messages,
)
from qtrader_tools.stress.probes import family_total, labelled
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions
from qtrader_tools.stress.scenarios.broker_outage import (
    START_TIMEOUT_S,
    Pipeline,
    ReadBack,
    at_least,
    health_of,
    judge_pipeline,
    not_ok,
    pipeline_policy,
    read_back,
    recovered,
    settled_snapshot,
    start_pipeline,
    wait_quiet,
)

POLICY = pipeline_policy("stress-poison")
FULL_COPIES = 10
FULL_HOLD_S = 30.0
MIN_HOLD_S = 3.0
LATCH_REFUSAL_S = 1.0  # a bad latch halts execution within this
STEP_TIMEOUT_S = 20.0
REJECTED = "qtrader_messages_rejected_total"
SENT = "qtrader_orders_sent_total"
_ALL = subjects.all_of
# What each workload's consumers (the ``consumer`` label of its rejection count) subscribe to;
# the rest of the catalogue is the operator's (risk alerts' durable, halt acknowledgements).
CONSUMERS: dict[str, dict[str, tuple[str, ...]]] = {
    "marketdata": {},  # reads its own last candles at start only
    "inference": {"inference-candles": (_ALL(subjects.CANDLE_PREFIX),)},
    "execution": {
        "prices": (_ALL(subjects.CANDLE_PREFIX),),
        "execution-signals": (_ALL(subjects.SIGNAL_PREFIX),),
        "execution-intents": (_ALL(subjects.ORDER_INTENT_PREFIX),),
        "execution-updates": (_ALL(subjects.ORDER_UPDATE_PREFIX),),
        "execution-fills": (_ALL(subjects.FILL_PREFIX),),
        "equity": (subjects.PORTFOLIO_SNAPSHOT,),
        "halt": (subjects.CONTROL_HALT,),
        "heartbeat": (subjects.CONTROL_HEARTBEAT,),
    },
    "portfolio": {
        "marks": (_ALL(subjects.CANDLE_PREFIX),),
        "portfolio-fills": (_ALL(subjects.FILL_PREFIX), subjects.ACCOUNT_ENTRY),
        "viewer": (  # the viewer feed it serves (qtrader.viewer.feed.VIEWED)
            subjects.CONTROL_HALT,
            subjects.CONTROL_ESS_STATUS,
            _ALL(subjects.ORDER_UPDATE_PREFIX),
            _ALL(subjects.FILL_PREFIX),
            _ALL(subjects.RISK_ALERT_PREFIX),
            subjects.PORTFOLIO_SNAPSHOT,
            _ALL(subjects.HEALTH_REPORT_PREFIX),
        ),
    },
}
DURABLES = (subjects.INFERENCE_CANDLES, subjects.EXECUTION_SIGNALS, subjects.EXECUTION_INTENTS)


def run(options: StressOptions, result: ScenarioResult) -> None:
    asyncio.run(_run(options, result))


async def _run(options: StressOptions, result: ScenarioResult) -> None:
    copies = max(1, math.floor(FULL_COPIES * options.scale))
    hold_s = options.scaled(FULL_HOLD_S, minimum=MIN_HOLD_S)
    result.figures.update({"catalogue copies": copies, "bad latch held s": hold_s})
    async with Rig(options.work_dir) as rig, _raw(rig.url) as raw:
        pipeline = await start_pipeline(rig, options, 0, policy=POLICY)  # stopped by us
        supervisor = rig.supervise(pipeline.workers)
        await _first_fill(rig, pipeline)
        baseline = await health_of(rig, pipeline.workers)
        await _poison_subjects(rig, raw, pipeline, result, copies=copies)
        options.say("poison: subjects done; bad policy values")
        await _poison_policy(rig, raw, pipeline, result)
        options.say("poison: bad latch values")
        await _poison_latch(rig, raw, pipeline, result, hold_s=hold_s)
        good_at_ms = await _write_good(rig, pipeline, result)
        health = await health_of(rig, pipeline.workers)
        options.say("poison: trading resumed; stopping the feed and draining")
        supervisor.hold(pipeline.marketdata.name)
        rig.children.stop([pipeline.marketdata.name])
        await wait_quiet(rig, pipeline, feed_stopped=True)
        back = await settled_snapshot(rig, await read_back(rig))
        unsettled = await _unsettled(raw.jetstream())
        restarts = supervisor.restarts
    result.figures["supervisor restarts"] = restarts
    result.check("supervisor restarts", sum(restarts.values()), "==", 0)
    result.figures["durable consumers at the end"] = unsettled
    result.check("consumer messages unsettled", sum(unsettled.values()), "==", 0)
    result.check(
        "orders filled after the good latch and policy",
        sum(1 for f in back.fills if f.ts_ms > good_at_ms),
        ">",
        0,
    )
    derived = derived_from_poison(back)
    result.figures["messages derived from the poison"] = dict(derived)
    result.check("messages derived from the poison", sum(derived.values()), "==", 0)
    result.figures["health at the end (checks not OK)"] = not_ok(health)
    healthy = sum(recovered(w, health[w], baseline.get(w, {})) for w in health)
    result.check("workers whose /health recovered", healthy, "==", 4)
    judge_pipeline(result, back, policy=POLICY)


@contextlib.asynccontextmanager
async def _raw(url: str) -> AsyncIterator[Client]:
    """A plain nats-py client: it publishes bytes no ``Bus`` would encode."""
    client = await nats.connect(url, name="qtrader-stress-poison")
    try:
        yield client
    finally:
        await client.close()


async def _first_fill(rig: Rig, pipeline: Pipeline) -> None:
    await rig.until(
        lambda: at_least(family_total(rig, pipeline.execution, "qtrader_fills_total"), 1),
        timeout_s=START_TIMEOUT_S,
        what="the first fill",
    )


# --- 1: the subjects ---------------------------------------------------------------------------


async def _poison_subjects(
    rig: Rig, raw: Client, pipeline: Pipeline, result: ScenarioResult, *, copies: int
) -> None:
    """Publish the catalogue; wait until every consumer counted exactly the poison on its
    subjects (by the ``consumer`` label of ``qtrader_messages_rejected_total``)."""
    catalogue = published_poison()
    expected = {
        f"{worker} {label}": copies * sum(1 for s, _ in catalogue if matches(s, patterns))
        for worker, consumers in CONSUMERS.items()
        for label, patterns in consumers.items()
    }
    before = await _rejections(rig, pipeline)
    errors_before = await _handler_errors(rig, pipeline)
    for _ in range(copies):
        for subject, payload in catalogue:
            await raw.publish(subject, payload)
        await raw.flush(timeout=10)
    result.figures["poison published"] = copies * len(catalogue)
    counted: dict[str, int] = {}

    async def all_counted() -> bool:
        now = await _rejections(rig, pipeline)
        counted.update({k: int(now.get(k, 0) - before.get(k, 0)) for k in expected})
        return all(counted[k] >= n for k, n in expected.items())

    with contextlib.suppress(ScenarioFailure):  # judged below as it stands
        await rig.until(all_counted, timeout_s=STEP_TIMEOUT_S, what="every poison to be counted")
    await asyncio.sleep(1.0)  # a late redelivery would count twice: let it show
    await all_counted()
    result.figures["poison per consumer (expected)"] = expected
    result.figures["poison per consumer (counted)"] = counted
    wrong = {k: counted[k] - n for k, n in expected.items() if counted[k] != n}
    result.figures["consumers that did not count their poison exactly"] = wrong
    result.check("consumers that did not count their poison exactly", len(wrong), "==", 0)
    errors = await _handler_errors(rig, pipeline) - errors_before
    result.check("handler errors", errors, "==", 0)


def matches(subject: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``subject`` is one of ``patterns`` (NATS subjects; ``*`` is one token)."""
    tokens = subject.split(".")
    return any(
        len(p := pattern.split(".")) == len(tokens)
        and all(a in ("*", b) for a, b in zip(p, tokens, strict=True))
        for pattern in patterns
    )


async def _rejections(rig: Rig, pipeline: Pipeline) -> dict[str, float]:
    """``qtrader_messages_rejected_total`` per workload and consumer, over the reasons."""
    found: dict[str, float] = {}
    for worker in pipeline.workers:
        for labels, value in (await labelled(rig, worker, REJECTED)).items():
            consumer = labels.split('consumer="', 1)[1].split('"', 1)[0]
            key = f"{worker.name} {consumer}"
            found[key] = found.get(key, 0.0) + value
    return found


async def _handler_errors(rig: Rig, pipeline: Pipeline) -> float:
    errors = "qtrader_handler_errors_total"
    return sum([await family_total(rig, w, errors) for w in pipeline.workers])


# --- 2: the policy key -------------------------------------------------------------------------


async def _poison_policy(rig: Rig, raw: Client, pipeline: Pipeline, result: ScenarioResult) -> None:
    """Each bad value, once every workload refused the one before; orders go on meanwhile."""
    kv = await raw.jetstream().key_value(subjects.POLICY_BUCKET)
    samples = {m.KIND: m for m in sample_messages()}
    values = bad_values(samples["policy_revision"], samples["halt_latch"])
    refused = "qtrader_policy_refused_total"
    sent_before = await family_total(rig, pipeline.execution, SENT)
    missed = 0
    for value in values:
        before = {w.name: await family_total(rig, w, refused) for w in pipeline.workers}
        await kv.put(subjects.POLICY_KEY, value)
        if not await _eventually(rig, _all_rose(rig, pipeline.workers, refused, before)):
            missed += 1
    kept = sum([await _kept_policy(rig, w) for w in pipeline.workers])
    sent = await family_total(rig, pipeline.execution, SENT) - sent_before
    result.figures.update(
        {"bad policy values": len(values), "orders sent under a refused policy": int(sent)}
    )
    result.check("policy values not refused by every workload", missed, "==", 0)
    result.check("workloads that kept the last good policy", kept, "==", len(pipeline.workers))


async def _kept_policy(rig: Rig, worker: Child) -> bool:
    """DEGRADED naming the refusal, the last good revision still in force."""
    status, detail = (await health_of(rig, [worker]))[worker.name].get("policy", ("", ""))
    return status == "DEGRADED" and "refused" in detail and "stays in force" in detail


# --- 3: the latch key --------------------------------------------------------------------------


async def _poison_latch(
    rig: Rig, raw: Client, pipeline: Pipeline, result: ScenarioResult, *, hold_s: float
) -> None:
    """Each bad value must halt execution (fail closed); held ``hold_s``, no order is sent."""
    kv = await raw.jetstream().key_value(subjects.HALT_BUCKET)
    samples = {m.KIND: m for m in sample_messages()}
    values = bad_values(samples["halt_latch"], samples["control_heartbeat"])
    execution = pipeline.execution
    refused = "qtrader_halt_latch_refused_total"
    denied = "qtrader_signals_denied_total"
    missed, latencies = 0, []
    sent_at_write = await family_total(rig, execution, SENT)
    sent_at_refusal: float | None = None
    for value in values:
        before = {execution.name: await family_total(rig, execution, refused)}
        await kv.put(subjects.HALT_KEY, value)
        written = time.monotonic()
        if await _eventually(rig, _all_rose(rig, [execution], refused, before)):
            latencies.append(round(time.monotonic() - written, 3))
        else:
            missed += 1
        if sent_at_refusal is None:
            sent_at_refusal = await family_total(rig, execution, SENT)
    denied_before = await family_total(rig, execution, denied)
    critical = await _latch_critical(rig, execution)
    await asyncio.sleep(hold_s)
    rig.check()
    sent_at_end = await family_total(rig, execution, SENT)
    result.figures.update(
        {
            "bad latch values": len(values),
            "seconds from each bad latch to its refusal": latencies,
            "orders sent between the first bad latch and its refusal": int(
                (sent_at_refusal or sent_at_write) - sent_at_write
            ),
            "execution halt-latch CRITICAL while refused": critical,
        }
    )
    result.check("latch values not refused", missed, "==", 0)
    result.check(
        "seconds from a bad latch to HALTED", max(latencies, default=None), "<=", LATCH_REFUSAL_S
    )
    result.check("execution /health halt-latch CRITICAL", int(critical), "==", 1)
    result.check(
        "orders sent while execution held a refused latch",
        int(sent_at_end - (sent_at_refusal or sent_at_end)),
        "==",
        0,
    )
    result.check(
        "signals denied while halted",
        int(await family_total(rig, execution, denied) - denied_before),
        ">",
        0,
    )


async def _latch_critical(rig: Rig, execution: Child) -> bool:
    status, detail = (await health_of(rig, [execution]))[execution.name].get("halt-latch", ("", ""))
    return status == "CRITICAL" and "does not decode" in detail


# --- 4: good values back -----------------------------------------------------------------------


async def _write_good(rig: Rig, pipeline: Pipeline, result: ScenarioResult) -> int:
    """A good latch and a good policy; returns when (ms) they were written, once execution sends
    orders again."""
    written_ms = int(time.time() * 1000)
    written = time.monotonic()
    sent = await family_total(rig, pipeline.execution, SENT)
    await write_latch(rig.bus, state=TradingState.ACTIVE, reason="stress", issued_by=ISSUER)
    await rig.publish_policy(POLICY)
    with contextlib.suppress(ScenarioFailure):  # judged from FILLS: no fill after, no pass
        await rig.until(
            lambda: at_least(family_total(rig, pipeline.execution, SENT), sent + 1),
            timeout_s=STEP_TIMEOUT_S,
            what="an order after the good latch and policy",
        )
        result.figures["orders again after s"] = round(time.monotonic() - written, 2)
    return written_ms


# --- helpers -----------------------------------------------------------------------------------


def _all_rose(
    rig: Rig, workers: list[Child], metric: str, before: dict[str, float]
) -> Callable[[], Awaitable[bool]]:
    async def rose() -> bool:
        return all([await family_total(rig, w, metric) > before[w.name] for w in workers])

    return rose


async def _eventually(rig: Rig, condition: Callable[[], Awaitable[bool]]) -> bool:
    try:
        await rig.until(condition, timeout_s=STEP_TIMEOUT_S, what="a count", interval_s=0.02)
    except ScenarioFailure:
        return False
    return True


async def _unsettled(js: JetStreamContext) -> dict[str, int]:
    """Per durable consumer: messages pending, awaiting an ack, or being redelivered."""
    found = {}
    for spec in DURABLES:
        info = await js.consumer_info(spec.stream.name, spec.durable)
        found[spec.durable] = (
            (info.num_pending or 0) + (info.num_ack_pending or 0) + (info.num_redelivered or 0)
        )
    return found


def derived_from_poison(back: ReadBack) -> Counter[str]:
    """Messages in the streams that carry a sample message's ids or times: made from poison."""
    ids = {i for m in sample_messages() for i in _ids(m)}
    found: Counter[str] = Counter()
    found["candles"] = sum(
        1 for c in back.candles if c.open_time_ms == T0 and c.symbol == SAMPLE_SYMBOL
    )
    found["signals"] = sum(
        1 for s in back.signals if s.signal_id in ids or s.candle_open_time_ms == T0
    )
    found["intents"] = sum(1 for i in back.intents if {i.intent_id, i.signal_id} & ids)
    found["updates"] = sum(1 for u in back.updates if {u.intent_id, u.client_order_id} & ids)
    found["fills"] = sum(1 for f in back.fills if {f.fill_id, f.client_order_id} & ids)
    return found


def _ids(message: Message) -> set[str]:
    names = ("signal_id", "intent_id", "fill_id", "client_order_id", "alert_id")
    values = (getattr(message, name, None) for name in names)
    return {value for value in values if isinstance(value, str)}
