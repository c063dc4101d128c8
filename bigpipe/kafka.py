"""What every Kafka client of Bigpipe shares, and the topics it needs to exist."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from bigpipe.config import Config, TopicConfig

log = logging.getLogger(__name__)


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
        "logger": logging.getLogger("librdkafka"),
    }


def wanted_topics(config: Config) -> list[TopicConfig]:
    """Call topics, then one dead-letter topic per group, shaped like its source topic."""
    wanted = {t.name: t for t in config.topics}
    for consumer in config.consumers:
        source = wanted[consumer.topic]
        wanted.setdefault(
            consumer.dead_letter_topic,
            TopicConfig(
                consumer.dead_letter_topic,
                source.partitions,
                source.replication_factor,
                source.min_insync_replicas,
            ),
        )
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
    missing = [_new_topic(t, limit) for t in wanted_topics(config) if t.name not in existing]
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


def _new_topic(topic: TopicConfig, record_limit: int) -> NewTopic:
    settings = {"max.message.bytes": str(record_limit)}
    if topic.min_insync_replicas is not None:
        settings["min.insync.replicas"] = str(topic.min_insync_replicas)
    return NewTopic(
        topic.name,
        num_partitions=topic.partitions,
        replication_factor=topic.replication_factor,
        config=settings,
    )
