"""Each topic's record size limit (its max.message.bytes), learned from Kafka when needed.

The broker checks the limit per record batch, not per record. librdkafka packs the
records written to one partition within linger.ms into one batch and does not know
the topic's limit, so one record too large for a topic created outside Bigpipe (with a
max.message.bytes under librdkafka's batch.size) takes the whole batch down: every
record in it is refused as too large. Kafka's Java producer splits such a batch and
sends it again; librdkafka does not. The producer (bigpipe.ingest.producer) does it
per record, with the limit learned here: a record that fits alone is written again,
and once the limit is known a record over it is refused before it joins a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

log = logging.getLogger(__name__)

# A record batch's header (61 bytes, format v2) and one record's framing (length,
# attributes, timestamp and offset deltas, key and value lengths, header count: at
# most 21 bytes of varints) around the key and value: the size of a record sent alone.
BATCH_OVERHEAD_BYTES = 61 + 21
# A learned limit is trusted this long: an operator who changes the topic's
# max.message.bytes sees Bigpipe follow within it.
KNOWN_FOR_SECONDS = 60.0
DESCRIBE_TIMEOUT_SECONDS = 10.0


def alone_size(value: bytes, key: bytes | None) -> int:
    """The bytes a record takes in a batch of its own, uncompressed."""
    return BATCH_OVERHEAD_BYTES + len(value) + (len(key) if key else 0)


class RecordLimits:
    """Topic name to max.message.bytes, as Kafka last said (None: not known, or stale)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._known: dict[str, tuple[int, float]] = {}  # topic -> (limit, when learned)
        # Questions to Kafka under way, one per topic: the writes of one refused record
        # batch all ask at once, and share the answer.
        self._asking: dict[str, asyncio.Task[int | None]] = {}
        self._admin: AdminClient | None = None

    def known(self, topic: str) -> int | None:
        """The limit, if learned within KNOWN_FOR_SECONDS; never asks Kafka."""
        entry = self._known.get(topic)
        if entry is None:
            return None
        limit, learned_at = entry
        return limit if time.monotonic() - learned_at < KNOWN_FOR_SECONDS else None

    async def learn(self, topic: str) -> int | None:
        """The topic's limit, asked of Kafka unless known; None when Kafka does not answer."""
        if (limit := self.known(topic)) is not None:
            return limit
        asking = self._asking.get(topic)
        if asking is None:
            asking = self._asking[topic] = asyncio.ensure_future(self._ask(topic))
            asking.add_done_callback(lambda _: self._asking.pop(topic, None))
        return await asyncio.shield(asking)  # one waiter cancelled cancels not the others'

    async def _ask(self, topic: str) -> int | None:
        """describe_configs, in a thread: it blocks."""
        try:
            limit = await asyncio.to_thread(self._describe, topic)
        except (KafkaException, ValueError, TimeoutError) as exc:
            log.warning("cannot learn max.message.bytes of topic %s: %s", topic, exc)
            return None
        self._known[topic] = (limit, time.monotonic())
        return limit

    def _describe(self, topic: str) -> int:
        if self._admin is None:
            self._admin = AdminClient(self._settings)
        resource = ConfigResource(ResourceType.TOPIC, topic)
        future = self._admin.describe_configs([resource])[resource]
        entries = future.result(timeout=DESCRIBE_TIMEOUT_SECONDS)
        return int(entries["max.message.bytes"].value)
