"""JetStream's answers to one connection's publishes, gathered on one inbox subscription.

A JetStream publish is a request: the stream answers on the message's reply subject. nats-py's
``JetStreamContext.publish`` waits for each answer with its own timer, its own task when
gathered, and a random token from the kernel; a wave of a step's candles paid that for every
message, a fifth of the publisher's CPU. ``send_wave`` publishes a wave with one reply subject
per message under one inbox subscription and waits for all the answers under one deadline.

Each message's outcome is its own: the stream's ``StreamAck``, or ``BusUnavailable`` when it
got no answer within the deadline, the connection refused it, nothing stores its subject (the
server's no-responders status) or the stream answered that it is unavailable. Any other error
the stream answers (a limit of the stream, a message too large), or an answer that is no ack,
raises ``BusError``: a fault of the set-up, not an outage to wait out (an outbox replaying it
would wait forever).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Sequence

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from qtrader.bus.errors import BusError, BusUnavailable
from qtrader.bus.outbox_publisher import Entry, StreamAck

Answer = StreamAck | BusUnavailable

_NO_RESPONDERS = "503"  # the status header's value when nothing stores the subject
_UNAVAILABLE = 503  # the code of a stream's error answer when it is unavailable (no quorum)
# What the connection raises for a publish it cannot take now (closed, or reconnecting with
# its pending buffer full).
_REFUSED = (
    nats.errors.ConnectionClosedError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    OSError,
)


class StreamAcks:
    """One connection's inbox for publish answers; open it once the client is connected."""

    def __init__(self, client: Client, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()

    @classmethod
    async def open(cls, client: Client) -> StreamAcks:
        acks = cls(client, client.new_inbox() + ".")
        # The server handles a connection's commands in order: the SUB precedes any PUB.
        await client.subscribe(acks._prefix + "*", cb=acks._on_answer)
        return acks

    async def send_wave(
        self, entries: Sequence[Entry], *, timeout_s: float, failed: Callable[[str], None]
    ) -> list[Answer]:
        """Publish every entry, then wait at most ``timeout_s`` for all their answers.
        ``failed(subject)`` is called for each that comes back ``BusUnavailable``."""
        tokens: list[str] = []
        refused: dict[str, Exception] = {}
        try:
            for subject, payload, msg_id in entries:
                token = str(next(self._tokens))
                self._waiting[token] = asyncio.get_running_loop().create_future()
                tokens.append(token)
                try:
                    await self._client.publish(
                        subject,
                        payload,
                        reply=self._prefix + token,
                        headers={"Nats-Msg-Id": msg_id},
                    )
                except _REFUSED as exc:
                    refused[token] = exc
            waiting = [self._waiting[t] for t in tokens if t not in refused]
            if waiting:
                await asyncio.wait(waiting, timeout=timeout_s)
            answers = [
                self._answer(subject, self._waiting[token], refused.get(token), timeout_s)
                for (subject, _, _), token in zip(entries, tokens, strict=True)
            ]
        finally:
            for token in tokens:
                self._waiting.pop(token).cancel()  # no-op once answered
        for (subject, _, _), answer in zip(entries, answers, strict=True):
            if isinstance(answer, BusUnavailable):
                failed(subject)
        return answers

    async def _on_answer(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._prefix) :])
        if future is not None and not future.done():  # a late answer's wait has ended
            future.set_result(msg)

    @staticmethod
    def _answer(
        subject: str, future: asyncio.Future[Msg], refused: Exception | None, timeout_s: float
    ) -> Answer:
        if refused is not None:
            return BusUnavailable(f"publish to {subject} refused by the connection: {refused!r}")
        if not future.done():
            return BusUnavailable(f"publish to {subject} not acknowledged within {timeout_s:g}s")
        msg = future.result()
        if msg.headers and msg.headers.get(api.Header.STATUS) == _NO_RESPONDERS:
            return BusUnavailable(f"publish to {subject}: no stream stores it (no responders)")
        try:
            answer = json.loads(msg.data)
            error = answer.get("error")
            ack = None if error is not None else api.PubAck.from_response(answer)
        except (ValueError, TypeError, AttributeError) as exc:
            raise BusError(f"publish to {subject}: the answer {msg.data!r} is no ack") from exc
        if ack is None:
            if isinstance(error, dict) and error.get("code") == _UNAVAILABLE:
                return BusUnavailable(f"publish to {subject} not stored: {error}")
            raise BusError(f"publish to {subject} refused by the stream: {error}")
        return StreamAck(sequence=int(ack.seq), duplicate=bool(ack.duplicate))
