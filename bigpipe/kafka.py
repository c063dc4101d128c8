"""What every Kafka client of Bigpipe shares, and the topics it needs to exist."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from bigpipe.calls.topics import INDEX_RETENTION_MS, INDEX_TOPIC
from bigpipe.config import Config, ConsumerConfig, TopicConfig
from bigpipe.delivery.rungs import RETENTION_MS, rung_topics

log = logging.getLogger(__name__)


async def leave_off_loop(name: str, leave: Callable[[], None], timeout: float) -> bool:
    """Run `leave` (a consumer's final commit and close) on a thread of its own; True if it
    ended within `timeout` s.

    Leaving a group needs its coordinator, which a rebalance in progress can hold for up to
    max.poll.interval.ms, and librdkafka's close, started mid-rebalance, was seen to wait
    for ever inside the revoke it runs. A daemon thread, so that an abandoned close never
    holds up the exit: an executor thread would, since the interpreter joins those.
    """
    loop = asyncio.get_running_loop()
    left: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            leave()
        except Exception:  # it must not pass unseen on a thread nobody joins
            log.exception("%s: leaving the group failed", name)
        finally:
            loop.call_soon_threadsafe(lambda: left.done() or left.set_result(None))

    threading.Thread(target=run, name=f"leave {name}", daemon=True).start()
    try:
        await asyncio.wait_for(left, timeout)
    except TimeoutError:
        return False
    return True


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


class RepeatFilter:
    """Decides whether to log a librdkafka error callback: see Throttle."""

    def __init__(self) -> None:
        self._throttle = Throttle()

    def __call__(self, error: KafkaError) -> str | None:
        """The text to log for this error, or None to stay quiet."""
        text = error.str()
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # librdkafka's "N/M brokers are down" counts connections (each bootstrap
            # address, and each broker learned from it) and reads the counts racily: one
            # lone broker gone was logged as "0/2 brokers are down".
            text = "no broker reachable: every connection to Kafka is down; retrying"
        held = self._throttle.admit((error.code(), text.split(" ", 1)[0]))  # code and broker
        if held is None:
            return None
        return f"{text} (and {held} more like it since)" if held else text


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


def client_settings(config: Config) -> dict[str, Any]:
    """Settings common to the producer, the consumers and the admin client."""
    return {
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


def ensure_topics(config: Config, timeout: float) -> list[str]:
    """Create what is missing and return its names. Blocking: run it in a thread.

    Raises KafkaException when Kafka cannot be reached or refuses a topic.
    """
    admin = AdminClient(client_settings(config))
    existing = admin.list_topics(timeout=timeout).topics
    for topic in wanted_topics(config):
        have = existing.get(topic.name)
        if have is not None and len(have.partitions) < topic.partitions:
            log.warning(
                "topic %s has %d partitions, config says %d; Bigpipe does not grow "
                "it because that would move keys between partitions",
                topic.name,
                len(have.partitions),
                topic.partitions,
            )
    limit = record_size_limit(config)
    missing = [
        _new_topic(t, limit, _own_settings(config, t.name))
        for t in wanted_topics(config)
        if t.name not in existing
    ]
    if not missing:
        return []
    futures = admin.create_topics(missing, operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        log.info("created topic %s", name)
    return list(futures)


# Bigpipe's own topics keep their records by time, whatever the broker's default.
_OWN_TOPIC_SETTINGS = {
    INDEX_TOPIC: {"cleanup.policy": "delete", "retention.ms": str(INDEX_RETENTION_MS)},
    BUDGET_TOPIC: {"cleanup.policy": "delete", "retention.ms": str(BUDGET_RETENTION_MS)},
}
_RUNG_SETTINGS = {"cleanup.policy": "delete", "retention.ms": str(RETENTION_MS)}


def _own_settings(config: Config, name: str) -> dict[str, str]:
    if config.status_enabled and name == config.status_topic:
        # delete, not compact: compaction would keep only the last step of each call.
        return {"cleanup.policy": "delete", "retention.ms": str(config.status_retention_ms)}
    rungs = {rung for consumer in config.consumers for rung in rung_topics(consumer)}
    return _RUNG_SETTINGS if name in rungs else _OWN_TOPIC_SETTINGS.get(name, {})


def _new_topic(topic: TopicConfig, record_limit: int, own: dict[str, str]) -> NewTopic:
    settings = {"max.message.bytes": str(record_limit), **own}
    if topic.min_insync_replicas is not None:
        settings["min.insync.replicas"] = str(topic.min_insync_replicas)
    return NewTopic(
        topic.name,
        num_partitions=topic.partitions,
        replication_factor=topic.replication_factor,
        config=settings,
    )


DRAIN_POLL_MARGIN_MS = 30_000  # max.poll.interval.ms beyond the shutdown timeout


def consumer_settings(config: Config, consumer: ConsumerConfig) -> dict[str, Any]:
    return {
        **client_settings(config),
        "group.id": consumer.group_id,
        "client.id": f"bigpipe-{consumer.group_id}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A group seen for the first time must start at the oldest call, not the newest:
        # calls accepted before the group existed are owed a delivery too.
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 2_000,
        # Also the rebalance timeout: how long a rebalance may wait for a slow member. The
        # poll loop never pauses for more than a moment, except in a drain: it stops while
        # calls in flight finish, for up to the shutdown timeout, and a member that does
        # not poll for longer than this is evicted, its final commit refused.
        "max.poll.interval.ms": max(60_000, config.shutdown_timeout_ms + DRAIN_POLL_MARGIN_MS),
        # Bound what librdkafka prefetches, so memory stays bounded under a backlog.
        "queued.max.messages.kbytes": 8_192,
        # librdkafka's statistics carry each partition's lag, for /metrics.
        "statistics.interval.ms": 5_000,
    }
