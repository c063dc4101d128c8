"""Read a topic's records in a time window, for the operator commands (dlq, replay).

The window starts where Kafka's offsets-for-times puts `since` (or at the oldest
record still kept) and ends at `until`'s offset, or at the high watermark as it
was when the read began: records written meanwhile (a redrive's own) are not read.
No consumer group is joined and nothing is committed. Blocking: run it in a thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from bigpipe.config import Config
from bigpipe.kafka import client_settings

TIMEOUT_SECONDS = 30.0
WAIT_SECONDS = 0.1
BATCH = 500


class TopicMissing(LookupError):
    """The topic does not exist (yet): nothing to read."""


def reader(config: Config) -> Consumer:
    settings: dict[str, Any] = {
        **client_settings(config),
        "group.id": "bigpipe-operator",  # librdkafka wants one; never joined or committed
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # The end of a partition ends its read even where compaction left a gap before it.
        "enable.partition.eof": True,
    }
    return Consumer(settings)


def read_window(
    config: Config, topic: str, since_ms: int | None = None, until_ms: int | None = None
) -> Iterator[Message]:
    """Every record of `topic` written in [since_ms, until_ms), in order within each
    partition, the partitions read together."""
    consumer = reader(config)
    try:
        yield from _read(consumer, _bounds(consumer, topic, since_ms, until_ms))
    finally:
        consumer.close()


def _bounds(
    consumer: Consumer, topic: str, since_ms: int | None, until_ms: int | None
) -> list[tuple[TopicPartition, int]]:
    """Per partition, the first offset to read and the offset to stop before."""
    metadata = consumer.list_topics(topic, timeout=TIMEOUT_SECONDS).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise TopicMissing(topic)
    numbers = sorted(metadata.partitions)
    ends = {
        n: consumer.get_watermark_offsets(TopicPartition(topic, n), timeout=TIMEOUT_SECONDS)[1]
        for n in numbers
    }
    starts = _offsets_at(consumer, topic, numbers, since_ms, default=OFFSET_BEGINNING)
    if until_ms is not None:
        for n, offset in _offsets_at(consumer, topic, numbers, until_ms, default=-1).items():
            if offset >= 0:  # -1: nothing at or after `until`, so read to the end
                ends[n] = min(ends[n], offset)
    return [(TopicPartition(topic, n, starts[n]), ends[n]) for n in numbers]


def _offsets_at(
    consumer: Consumer, topic: str, numbers: list[int], at_ms: int | None, default: int
) -> dict[int, int]:
    if at_ms is None:
        return dict.fromkeys(numbers, default)
    asked = [TopicPartition(topic, n, at_ms) for n in numbers]
    found = consumer.offsets_for_times(asked, timeout=TIMEOUT_SECONDS)
    # Past the newest record Kafka answers -1 (the end): nothing to read from `since`.
    return {tp.partition: tp.offset for tp in found}


def _read(consumer: Consumer, bounds: list[tuple[TopicPartition, int]]) -> Iterator[Message]:
    ends = {
        start.partition: end
        for start, end in bounds
        if end > 0 and (start.offset < 0 or start.offset < end) and start.offset != -1
    }
    if not ends:
        return
    consumer.assign([start for start, _ in bounds if start.partition in ends])
    idle_until = time.monotonic() + TIMEOUT_SECONDS
    while ends:
        # consume() waits its whole timeout unless the batch fills: ask often, briefly.
        messages = consumer.consume(BATCH, timeout=WAIT_SECONDS)
        if not messages:
            if time.monotonic() > idle_until:
                raise KafkaException(
                    f"no record of partitions {sorted(ends)} within {TIMEOUT_SECONDS:.0f} s "
                    "before their end; is Kafka reachable?"
                )
            continue
        idle_until = time.monotonic() + TIMEOUT_SECONDS
        for message in messages:
            error, partition = message.error(), message.partition()
            if partition not in ends:
                continue  # finished: what follows its end is not in the window
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(error)
            if error is None and message.offset() < ends[partition]:
                yield message
            if error is not None or message.offset() >= ends[partition] - 1:
                del ends[partition]
