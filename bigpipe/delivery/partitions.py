"""Which of a group's assigned partitions are paused, and why.

librdkafka keeps its own pause flag on a partition across an incremental unassign and
assign: a partition revoked while paused comes back paused. So every partition this
member is given is resumed explicitly at once, and from then on this class is the one
record of what is paused and for what reason (shown in /stats and /metrics).

librdkafka also learns a partition's high watermark only from fetches, which a pause
stops, so the lag of a paused partition would freeze at its value when paused; the
broker is asked for paused partitions' high watermarks instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger(__name__)

# Seconds for one round of queries, all partitions together; it runs in a thread, and
# stop() waits for a round under way.
WATERMARK_TIMEOUT = 2.0

CONSUMING = "consuming"
HELD = "held"  # destinations hold destination.maxHeld calls (open breakers, Retry-After)
BUFFER = "buffer"  # maxBuffered calls are waiting in this process
ORDERING = "ordering"  # maxBuffered calls are held behind an earlier call of their key


class PartitionStates:
    def __init__(self, kafka: Consumer, topic: str, shown: dict[str, str]) -> None:
        """`shown` is kept up to date with each assigned partition's state, for /stats:
        "consuming" or "paused:<reason>"."""
        self._kafka = kafka
        self._topic = topic
        self._paused: dict[int, str] = {}  # partition -> why it is paused
        self._assigned: set[int] = set()
        self._shown = shown
        self._highs: dict[int, int] = {}  # paused partition -> high watermark, from the broker
        self._query: asyncio.Future[dict[int, int]] | None = None

    @property
    def any_paused(self) -> bool:
        return bool(self._paused)

    def assigned(self, numbers: list[int]) -> None:
        """New partitions start consuming, whatever flag librdkafka kept for them."""
        self._assigned.update(numbers)
        for number in numbers:
            self._paused.pop(number, None)
        if numbers:
            self._kafka.resume(self.topic_partitions(numbers))
        self._show()

    def removed(self, numbers: list[int]) -> None:
        for number in numbers:
            self._assigned.discard(number)
            self._paused.pop(number, None)
            self._highs.pop(number, None)
        self._show()

    def hold(self, reason: str | None) -> None:
        """Pause every assigned partition for `reason`, or resume them all for None."""
        if reason is None:
            if self._paused:
                self._kafka.resume(self.topic_partitions(self._paused))
                self._paused.clear()
                self._show()
            return
        running = self._assigned - self._paused.keys()
        if running:
            self._kafka.pause(self.topic_partitions(running))
        if running or any(why != reason for why in self._paused.values()):
            self._paused = dict.fromkeys(self._assigned, reason)
            self._show()

    def high_watermark(self, number: int, from_fetches: int) -> int:
        """The partition's high watermark: librdkafka's, or newer from the broker if paused."""
        return max(from_fetches, self._highs.get(number, -1))

    def refresh_high_watermarks(self) -> None:
        """Ask the broker for the paused partitions' high watermarks, off the event loop."""
        if not self._paused or (self._query is not None and not self._query.done()):
            return
        numbers = sorted(self._paused)
        self._query = asyncio.ensure_future(asyncio.to_thread(self._query_highs, numbers))
        self._query.add_done_callback(self._store_highs)

    async def settle(self) -> None:
        """Wait for a query under way: the consumer must not close beneath it."""
        if self._query is not None:
            await asyncio.gather(self._query, return_exceptions=True)

    def _query_highs(self, numbers: list[int]) -> dict[int, int]:
        """One request a partition, within WATERMARK_TIMEOUT in all: a broker that does
        not answer made each partition wait its own timeout, one after another."""
        highs: dict[int, int] = {}
        deadline = time.monotonic() + WATERMARK_TIMEOUT
        for number in numbers:
            left = deadline - time.monotonic()
            if left <= 0:  # the rest are asked at the next statistics round
                break
            tp = TopicPartition(self._topic, number)
            try:
                highs[number] = self._kafka.get_watermark_offsets(tp, left)[1]
            except KafkaException as exc:  # next statistics round asks again
                log.debug("%s/%d: high watermark unknown: %s", self._topic, number, exc)
        return highs

    def _store_highs(self, query: asyncio.Future[dict[int, int]]) -> None:
        if query.cancelled() or query.exception() is not None:
            return
        for number, high in query.result().items():
            if number in self._assigned:
                self._highs[number] = high

    def _show(self) -> None:
        self._shown.clear()
        for number in sorted(self._assigned):
            why = self._paused.get(number)
            self._shown[str(number)] = CONSUMING if why is None else f"paused:{why}"

    def topic_partitions(self, numbers: Iterable[int]) -> list[TopicPartition]:
        return [TopicPartition(self._topic, n) for n in sorted(numbers)]
