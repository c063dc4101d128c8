"""The parts of Bigpipe's Kafka plumbing that work with librdkafka's clients: the filter
of their error callbacks, leaving a group, and the creation of the topics Bigpipe needs
(bigpipe.kafka)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from bigpipe.calls.topics import INDEX_RETENTION_MS, INDEX_TOPIC
from bigpipe.config import Config, TopicConfig
from bigpipe.delivery.rungs import RETENTION_MS, rung_topics
from bigpipe.kafka import (
    BUDGET_RETENTION_MS,
    BUDGET_TOPIC,
    Throttle,
    client_settings,
    record_size_limit,
    wanted_topics,
)

log = logging.getLogger("bigpipe.kafka")  # the name its lines had before this module


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
