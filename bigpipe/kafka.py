"""What every Kafka client of Bigpipe is told, and the topics Bigpipe needs.

No librdkafka here (that is bigpipe.kafka_client): the supervisor plans reloads with
these, and it must not load the Kafka library (bigpipe.node.workers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from bigpipe.calls.topics import INDEX_TOPIC
from bigpipe.config import Config, ConsumerConfig, TopicConfig
from bigpipe.delivery.rungs import rung_topics


class Throttle:
    """The first event of each kind, then at most one per interval, with a count of the rest.

    While Kafka is away librdkafka reports every failed reconnect, several times a second
    per client; tests/faults counted ~30 such lines a second from one node. The first one
    says it all; later ones are counted into the next line that does get through.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._next: dict[object, float] = {}
        self._quiet: dict[object, int] = {}

    def admit(self, kind: object) -> int | None:
        """How many of this kind were held back since the last one through; None: hold it."""
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return None
        self._next[kind] = now + self._interval
        return self._quiet.pop(kind, 0)


class LibrdkafkaLogFilter(logging.Filter):
    """Throttles librdkafka's own log lines per facility and client (see Throttle)."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        held = self._throttle.admit(tuple(message.split(" ", 2)[:2]))  # "FACILITY [client]"
        if held:
            record.msg, record.args = f"{message} (and {held} more like it since)", None
        return held is not None


LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
LIBRDKAFKA_LOG.addFilter(LibrdkafkaLogFilter())


def record_size_limit(config: Config) -> int:
    """The largest record Bigpipe writes.

    A call envelope is the body plus forwarded headers; a dead letter may carry
    an undecodable record in base64 (4/3 of its size). Twice the body limit plus
    1 MiB covers both with room to spare.
    """
    return 2 * (config.body_limit + (1 << 20))


def client_settings(config: Config, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Settings common to the producer, the consumers and the admin client: Bigpipe's
    `defaults` for this client, under the operator's own settings (kafka.client.config),
    which may tune them. The settings it owns come after these, and the config refuses
    them (config.OWNED_KAFKA_SETTINGS)."""
    return {
        **(defaults or {}),
        **config.kafka_client_config,
        "bootstrap.servers": config.bootstrap_servers,
        # librdkafka's own log lines go through Python logging, not straight to stderr.
        "logger": LIBRDKAFKA_LOG,
    }


# The members' budget reports (bigpipe.delivery.budget): one partition, and a minute of
# them, since a report is stale after two seconds.
BUDGET_TOPIC = "bigpipe.budget"
BUDGET_RETENTION_MS = 60_000


def wanted_topics(config: Config) -> list[TopicConfig]:
    """Call topics, then per group a dead-letter topic and the delay topics (its ladder's
    rungs, bigpipe.delivery.rungs), shaped like its source topic."""
    wanted = {t.name: t for t in config.topics}
    for consumer in config.consumers:
        source = wanted[consumer.topic]
        for name in (consumer.dead_letter_topic, *rung_topics(consumer)):
            wanted.setdefault(name, source.model_copy(update={"name": name}))
    index = config.topics[0]  # Bigpipe's own topics, made as durable as the first topic
    for name in (INDEX_TOPIC, BUDGET_TOPIC):
        wanted.setdefault(name, index.model_copy(update={"name": name, "partitions": 1}))
    if config.status_enabled:  # as many partitions as the widest call topic: as busy
        partitions = max(t.partitions for t in config.topics)
        status = index.model_copy(update={"name": config.status_topic, "partitions": partitions})
        wanted.setdefault(config.status_topic, status)
    return list(wanted.values())


DRAIN_POLL_MARGIN_MS = 30_000  # max.poll.interval.ms beyond the shutdown timeout


# Once a reader's prefetch is full, librdkafka fetches again only after
# fetch.queue.backoff.ms, 1 s by default: a reader that empties it sooner sits idle for the
# rest of that second, every time. Measured with 1 s against 10 ms: a group's backlog of
# 2 KiB calls (1 worker to nginx) went at 4,987/5,232 against 9,479/10,583 calls/s; an
# idempotency index of 1,000,000 keys was read in 9.2 against 2.5 s.
FETCH_AGAIN_MS = 10
# Readers of Bigpipe's own topics from their beginning (the idempotency index, the status
# view). librdkafka's prefetch costs several times the payload it counts in RSS: reading
# that index peaked at 74 MiB with its defaults (64 MiB of prefetch), 39 with these.
CATCH_UP_DEFAULTS = {"queued.max.messages.kbytes": 1024, "fetch.queue.backoff.ms": FETCH_AGAIN_MS}

CONSUMER_DEFAULTS = {
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 2_000,
    # Bound what librdkafka prefetches, so memory stays bounded under a backlog.
    "queued.max.messages.kbytes": 8_192,
    "fetch.queue.backoff.ms": FETCH_AGAIN_MS,
    # librdkafka's statistics carry each partition's lag, for /metrics.
    "statistics.interval.ms": 5_000,
}


def consumer_settings(config: Config, consumer: ConsumerConfig) -> dict[str, Any]:
    return {
        **client_settings(config, CONSUMER_DEFAULTS),
        "group.id": consumer.group_id,
        "client.id": f"bigpipe-{consumer.group_id}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A group seen for the first time must start at the oldest call, not the newest:
        # calls accepted before the group existed are owed a delivery too.
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        # Also the rebalance timeout: how long a rebalance may wait for a slow member. The
        # poll loop never pauses for more than a moment, except in a drain: it stops while
        # calls in flight finish, for up to the shutdown timeout, and a member that does
        # not poll for longer than this is evicted, its final commit refused.
        "max.poll.interval.ms": max(60_000, config.shutdown_timeout_ms + DRAIN_POLL_MARGIN_MS),
    }


def producer_settings(config: Config) -> dict[str, Any]:
    defaults = {
        # Callers wait for the acknowledgement, so linger is latency: 1 ms measured best
        # (0.2 and 0.5 ms make many more requests and cost more CPU, 2 and 3 ms wait).
        "linger.ms": 1,
        "queue.buffering.max.messages": 4 * config.channel_size + 10_000,
        "socket.keepalive.enable": True,
    }
    return {
        **client_settings(config, defaults),
        "client.id": "bigpipe",
        # Idempotence gives acks=all and no duplicates or reordering from librdkafka's own
        # retries: "accepted" then means every in-sync replica has the call.
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": config.producer_ack_timeout_ms,
        # librdkafka insists on at least one retry when idempotence is on.
        "message.send.max.retries": max(1, config.producer_retries),
        "message.max.bytes": record_size_limit(config),
    }
