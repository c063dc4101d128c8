"""Create the call topics and their dead-letter topics that Kafka does not have yet."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from bigpipe.config import Config, TopicConfig

log = logging.getLogger(__name__)


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
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
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
    missing = [_new_topic(t) for t in wanted_topics(config) if t.name not in existing]
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


def _new_topic(topic: TopicConfig) -> NewTopic:
    settings = {}
    if topic.min_insync_replicas is not None:
        settings["min.insync.replicas"] = str(topic.min_insync_replicas)
    return NewTopic(
        topic.name,
        num_partitions=topic.partitions,
        replication_factor=topic.replication_factor,
        config=settings,
    )
