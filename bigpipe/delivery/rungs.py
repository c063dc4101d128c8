"""The rungs of a group's delay-topic ladder: their waits and their topics' names."""

from __future__ import annotations

from bigpipe.config import ConsumerConfig

# (name, wait in ms): a call is written to the longest rung that does not pass its due
# time, and read back that wait later; a ripe call has less left than the next rung up.
RUNGS = (("1s", 1_000), ("10s", 10_000), ("1m", 60_000), ("10m", 600_000), ("1h", 3_600_000))
# A record is read back within an hour while the group runs; the rest covers an outage.
RETENTION_MS = 7 * 24 * 3600 * 1000


def rung_topics(consumer: ConsumerConfig) -> list[str]:
    return [f"{consumer.topic}.{consumer.group_id}.delay.{name}" for name, _ in RUNGS]


def rung_for(wait_ms: int) -> int:
    """The index of the longest rung whose wait is at most `wait_ms` (the first if none)."""
    index = 0
    for number, (_, rung_ms) in enumerate(RUNGS):
        if rung_ms <= wait_ms:
            index = number
    return index
