"""Calls that wait long wait in Kafka: a ladder of delay topics per consumer group.

A call whose due time is more than the group's `delayThreshold` away (a `delay_ms`,
a retry's backoff, or its destination's open breaker or Retry-After pause) is
written to the rung whose wait is the longest that does not pass its due time,
and its source offset may then be committed: the write is
acknowledged first, so the move is at-least-once. Each rung holds records in the
order written, and each record is ripe its rung's wait after it was written, so the
rungs are consumed with *pause until the head is ripe*: nothing is held in memory
while a call waits, whatever their number. A ripe call goes back through the group's
delivery: still far from due, it hops down the ladder; within the threshold, it is
held in memory until due and delivered.

The rungs are topics `<topic>.<groupId>.delay.<rung>` (RUNGS), created with the
group's dead-letter topic, with the source topic's partitions, and consumed by the
Kafka group `<groupId>.delay`, so that their members never count in the group's
budget.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from bigpipe.calls.envelope import Call, encode_call
from bigpipe.config import Config, ConsumerConfig
from bigpipe.delivery.offsets import PartitionOffsets
from bigpipe.delivery.rungs import RUNGS, rung_for, rung_topics
from bigpipe.delivery.waits import Due, now_ms
from bigpipe.ingest.producer import ProduceFailed, Producer, write_until_stored
from bigpipe.kafka import consumer_settings
from bigpipe.kafka_client import leave_off_loop
from bigpipe.stats import GroupCounters

log = logging.getLogger(__name__)

POLL_BATCH = 500
IDLE_POLL_SECONDS = 0.005
COMMIT_INTERVAL_SECONDS = 0.5
PARK_BACKOFF_MS = (200, 5_000)  # between tries of a write Kafka did not take


def delay_reader_settings(config: Config, consumer: ConsumerConfig) -> dict[str, Any]:
    """The group's own settings, under a group of its own: the delay readers never count
    against the group's budget."""
    return {
        # A resumed rung is fetched at once, not after the broker's usual wait.
        "fetch.wait.max.ms": 50,
        **consumer_settings(config, consumer),
        "group.id": f"{consumer.group_id}.delay",
        "client.id": f"bigpipe-{consumer.group_id}-delay",
    }


@dataclass(slots=True)
class _Rung:
    generation: int  # a resume timer of an earlier assignment does nothing (_resume)
    offsets: PartitionOffsets = field(default_factory=PartitionOffsets)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class DelayLadder:
    """One group's delay topics: park a call in them, and read ripe calls back."""

    def __init__(
        self,
        config: Config,
        consumer: ConsumerConfig,
        producer: Callable[[], Producer],
        handle: Callable[[Message], Awaitable[None]],
        counters: GroupCounters,
    ) -> None:
        self.config = consumer
        self._counters = counters
        self._producer = producer
        self._handle = handle
        self._topics = rung_topics(consumer)
        self._rung_ms = {topic: ms for topic, (_, ms) in zip(self._topics, RUNGS, strict=True)}
        self._kafka = Consumer(
            {**delay_reader_settings(config, consumer), "stats_cb": self._on_statistics}
        )
        self._rungs: dict[tuple[str, int], _Rung] = {}
        self._generations = itertools.count()
        self._stopping = asyncio.Event()
        self._leaving = False  # the close's callbacks run on its thread: see _cancel
        self._task: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        """Calls read back from the rungs and not finished yet."""
        return sum(len(rung.offsets) for rung in self._rungs.values())

    def should_park(self, call: Call) -> bool:
        return Due.remaining_s(call) * 1000 > self.config.delay_threshold_ms

    async def park(self, call: Call, key: bytes | None) -> bool:
        """Write the call to its rung; True once Kafka has it, False if Kafka refuses it
        for good (too large, say): it then waits where it is, in memory."""
        topic = self._topics[rung_for(call.due_ms - now_ms())]
        try:
            await write_until_stored(self._producer, topic, encode_call(call), key, PARK_BACKOFF_MS)
        except ProduceFailed as refusal:
            log.warning("%s: call %s waits in memory: %s", topic, call.id, refusal)
            return False
        return True

    # ------------------------------------------------------------ reading back
    def start(self) -> None:
        self._kafka.subscribe(
            self._topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._task = asyncio.create_task(self._poll_forever(), name=f"delay {self.config.topic}")

    async def stop(self, timeout: float) -> None:
        """Stop reading, let calls held for their due time finish, commit, leave."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        tasks = [task for rung in self._rungs.values() for task in rung.tasks]
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=max(0.1, timeout - 1))
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        self._leaving = True
        if not await leave_off_loop(f"{self.config.group_id}.delay", self._commit_and_close, 2.0):
            log.warning("%s: delay topics' final commit unconfirmed", self.config.group_id)

    def _commit_and_close(self) -> None:
        self._commit(asynchronous=False)
        self._kafka.close()

    async def _poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_commit = loop.time() + COMMIT_INTERVAL_SECONDS
        while not self._stopping.is_set():
            room = self.config.max_buffered - self.buffered
            messages = self._kafka.consume(max(1, min(POLL_BATCH, room)), timeout=0)
            paused: set[tuple[str, int]] = set()
            for message in messages:
                place = (message.topic(), message.partition())
                if message.error() is not None or place in paused or place not in self._rungs:
                    continue
                ripe_ms = message.timestamp()[1] + self._rung_ms[message.topic()]
                if ripe_ms > now_ms() or room <= 0:
                    self._hold_back(message, max(ripe_ms - now_ms(), 50))
                    paused.add(place)
                    continue
                room -= 1
                self._accept(message, self._rungs[place])
            if loop.time() >= next_commit:
                self._commit(asynchronous=True)
                next_commit = loop.time() + COMMIT_INTERVAL_SECONDS
            await asyncio.sleep(0 if messages else IDLE_POLL_SECONDS)

    def _hold_back(self, message: Message, wait_ms: int) -> None:
        """Pause the rung's partition at this record until it is ripe: the records
        after it ripen no sooner, since a rung keeps the order they were written in."""
        place = TopicPartition(message.topic(), message.partition())
        self._kafka.pause([place])
        self._kafka.seek(TopicPartition(message.topic(), message.partition(), message.offset()))
        rung = self._rungs[(message.topic(), message.partition())]
        generation = rung.generation
        asyncio.get_running_loop().call_later(
            wait_ms / 1000, self._resume, message.topic(), message.partition(), generation
        )

    def _resume(self, topic: str, partition: int, generation: int) -> None:
        rung = self._rungs.get((topic, partition))
        if rung is not None and rung.generation == generation and not self._stopping.is_set():
            self._kafka.resume([TopicPartition(topic, partition)])

    def _accept(self, message: Message, rung: _Rung) -> None:
        rung.offsets.track(message.offset())
        task = asyncio.create_task(self._handle(message))
        rung.tasks.add(task)
        task.add_done_callback(rung.tasks.discard)
        task.add_done_callback(
            lambda done: done.cancelled() or rung.offsets.finish(message.offset())
        )

    def _commit(self, asynchronous: bool, only: set[tuple[str, int]] | None = None) -> None:
        offsets = []
        for (topic, partition), rung in self._rungs.items():
            offset = rung.offsets.to_commit()
            if offset is not None and (only is None or (topic, partition) in only):
                offsets.append(TopicPartition(topic, partition, offset))
                rung.offsets.committed(offset)
        if offsets:
            try:
                self._kafka.commit(offsets=offsets, asynchronous=asynchronous)
            except KafkaException as exc:  # read again by the next owner: at-least-once
                log.warning("%s: delay commit failed: %s", self.config.group_id, exc)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            # A generation no earlier assignment had, whether or not its rung was forgotten.
            self._rungs[(tp.topic, tp.partition)] = _Rung(generation=next(self._generations))
        consumer.incremental_assign(partitions)
        # librdkafka keeps a partition's pause flag across an incremental unassign and
        # assign: a rung taken away while held back would come back paused for good, its
        # resume timer having found it gone (as PartitionStates.assigned does for calls).
        if partitions:
            consumer.resume(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        places = {(tp.topic, tp.partition) for tp in partitions}
        self._cancel(places)
        self._commit(asynchronous=True, only=places)
        self._forget(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._cancel({(tp.topic, tp.partition) for tp in partitions})
        self._forget(consumer, partitions)

    def _cancel(self, places: set[tuple[str, int]]) -> None:
        if self._leaving:  # on the close's thread, where no task of the loop's may be
            return  # touched; stop() has finished them all by then
        for place in places:
            for task in list(self._rungs[place].tasks) if place in self._rungs else []:
                task.cancel()

    def _forget(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._rungs.pop((tp.topic, tp.partition), None)
        consumer.incremental_unassign(partitions)

    def _on_statistics(self, raw: str) -> None:
        """Calls in each rung not yet read back: the due-time spread of what waits."""
        topics = orjson.loads(raw).get("topics", {})
        waiting: dict[str, int] = {}
        for topic, (name, _) in zip(self._topics, RUNGS, strict=True):
            partitions: dict[str, Any] = topics.get(topic, {}).get("partitions", {})
            waiting[name] = sum(
                max(0, state.get("consumer_lag", 0))
                for number, state in partitions.items()
                if number != "-1"
            )
        self._counters.waiting = waiting
