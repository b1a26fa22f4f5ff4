"""Read what the pipeline wrote, straight from JetStream, independently of the workloads' code."""

from __future__ import annotations

from typing import TypeVar

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from qtrader.contracts.messages import Message, decode

M = TypeVar("M", bound=Message)


async def read_all(url: str, *, stream: str, subject: str, message_type: type[M]) -> list[M]:
    """Every message stored on ``subject`` in ``stream``, oldest first."""
    connection = await nats.connect(url)
    try:
        js = connection.jetstream(timeout=15)  # a loaded CI machine answers slowly
        subscription = await js.pull_subscribe(
            subject,
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        messages: list[M] = []
        while True:
            try:
                batch = await subscription.fetch(500, timeout=0.5)
            except nats.errors.TimeoutError:
                return messages
            messages.extend(decode(m.data, message_type) for m in batch)
            # Stop at what the stream held when we caught up, even while producers keep going.
            if batch and batch[-1].metadata.num_pending == 0:
                return messages
    finally:
        await connection.close()


async def publish_raw(url: str, subject: str, payload: bytes, *, msg_id: str) -> None:
    connection = await nats.connect(url)
    try:
        await connection.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
    finally:
        await connection.close()
