"""One consumer group: poll calls from Kafka, deliver them concurrently, commit safely.

At-least-once rests on three rules:
- a partition's offset is committed only over a contiguous run of finished calls
  (delivered, or written to the dead-letter topic);
- a revoked partition commits what has finished and drops the rest, which its
  next owner delivers again; a lost partition commits nothing;
- a full buffer skips consume() for a moment and then pauses the partitions; so do
  too many calls held for destinations that may not be called yet (an open breaker,
  a Retry-After), which otherwise leave the buffer's room to the other destinations,
  and too many calls held behind an earlier call of their key (bigpipe.delivery.ordering);
  polling never stops for long, so the broker does not evict the consumer.

librdkafka fetches in its own threads; `consume(timeout=0)` only takes what it
already has, so the poll loop runs on the event loop without blocking it, and the
rebalance callbacks run there too, with no locks needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from bigpipe.calls.callbacks import send_callback
from bigpipe.calls.envelope import Call, InvalidRecord, decode_call
from bigpipe.calls.status import GroupTrail
from bigpipe.config import Config, ConsumerConfig
from bigpipe.delivery.budget import GroupBudget, Holding
from bigpipe.delivery.client import AttemptResult, CallerLookup, DeliveryClient, Outcome
from bigpipe.delivery.dead_letters import (
    DeadLetterWriter,
    dead_letter_limit,
    dead_letter_reason,
)
from bigpipe.delivery.delay_topics import DelayLadder
from bigpipe.delivery.offsets import PartitionOffsets
from bigpipe.delivery.ordering import UNORDERED, KeyChains, Turn, is_ordered
from bigpipe.delivery.partitions import BUFFER, HELD, ORDERING, PartitionStates
from bigpipe.delivery.retry import Verdict
from bigpipe.delivery.shields import DestinationShields
from bigpipe.delivery.waits import Due, now_ms
from bigpipe.ingest.compat import decode_go_record, is_go_record
from bigpipe.ingest.producer import Producer
from bigpipe.kafka import consumer_settings
from bigpipe.kafka_client import RepeatFilter, leave_off_loop
from bigpipe.metrics import GroupLatencies
from bigpipe.stats import GroupCounters

log = logging.getLogger(__name__)

POLL_BATCH = 500
REBALANCE_ERRORS = frozenset(
    {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID}
)
IDLE_POLL_SECONDS = 0.005
COMMIT_INTERVAL_SECONDS = 0.5
# How long the buffer may stay full, unpolled, before the group pauses its partitions.
# Short, because rebalances are only served while consume() runs.
STALL_SECONDS = 1.0
LEAVE_SECONDS = 1.0  # the least time given to the final commit and group leave
# The records a group holds in memory (read, not yet finished), per worker, besides
# maxBuffered calls: with large calls, a count alone let a worker hold hundreds of MiB.
BUFFER_BYTES = 32 << 20


# Is this keyed call the first of its key's window, so that it is to be delivered?
IsFirst = Callable[[Call], Awaitable[bool]]


@dataclass(slots=True)
class _Partition:
    chains: KeyChains  # with `ordering: "key"`: each key's calls, one at a time
    offsets: PartitionOffsets = field(default_factory=PartitionOffsets)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class ConsumerGroup:
    def __init__(
        self,
        config: Config,
        consumer: ConsumerConfig,
        producer: Producer,
        counters: GroupCounters,
        latencies: GroupLatencies,
        callers: CallerLookup,
        is_first: IsFirst,
        trail: GroupTrail,
    ) -> None:
        self.config = consumer
        self._trail = trail  # the steps of each call's life, for its status (bigpipe.calls.status)
        self._is_first = is_first
        self._counters = counters
        self._latencies = latencies
        self._dead_letters = DeadLetterWriter(
            self.name, dead_letter_limit(config), producer, counters
        )
        self._shields = DestinationShields(self.name, consumer, counters)
        self._client = DeliveryClient(
            consumer, counters, self._shields, callers, latencies.attempt, trail
        )
        self._repeats = RepeatFilter()  # a Kafka outage repeats one error many times a second
        self._kafka = Consumer(
            {
                **consumer_settings(config, consumer),
                "error_cb": self._on_error,
                "on_commit": self._on_commit,
                "stats_cb": self._on_statistics,
            }
        )
        self._partitions: dict[int, _Partition] = {}
        self._buffered_bytes = 0  # record bytes of the calls read and not yet finished
        self._states = PartitionStates(self._kafka, consumer.topic, counters.partitions)
        # rateLimit and concurrency are the whole group's: this member gets its share.
        self._budget = GroupBudget(
            config,
            consumer,
            self._kafka.memberid,
            self._holding,
            lambda: self.producer,
            self._client.limits,
            counters,
        )
        # Calls that wait long wait in the group's delay topics, read back by this ladder.
        self._ladder = DelayLadder(config, consumer, lambda: self.producer, self._process, counters)
        self._stopping = asyncio.Event()
        # Set once the final close starts: its rebalance callbacks run on the close's
        # thread, where nothing of the event loop's may be touched (and nothing is left
        # to cancel or to share out).
        self._leaving = False
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.config.topic}/{self.config.group_id}"

    @property
    def producer(self) -> Producer:
        return self._dead_letters.producer

    @producer.setter
    def producer(self, producer: Producer) -> None:
        """A reload's new producer: dead letters under way move to it (see Producer.close)."""
        self._dead_letters.producer = producer

    def update(self, consumer: ConsumerConfig) -> None:
        """Apply changed limits, retries, timeouts or breaker in place: no rebalance.

        The key (topic, groupId) never changes here; a new key is a new group.
        """
        self.config = self._ladder.config = consumer
        self._shields.update(consumer)
        self._client.update(consumer)
        self._budget.update(consumer)  # the limits: this member's share of the new budget
        log.info("%s: applied new settings", self.name)

    def start(self, on_poll_death: Callable[[], None]) -> None:
        """Join the group and poll; `on_poll_death` is called if the poll loop dies of an
        error, since this process then delivers nothing more for the group."""
        self._kafka.subscribe(
            [self.config.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._task = asyncio.create_task(self._poll_forever(), name=f"poll {self.name}")
        self._budget.start()
        self._ladder.start()
        self._task.add_done_callback(partial(self._poll_ended, on_poll_death))

    def _poll_ended(self, on_poll_death: Callable[[], None], task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.critical(
            "%s: the poll loop died; this process delivers nothing more for the group",
            self.name,
            exc_info=task.exception(),
        )
        on_poll_death()

    async def stop(self, timeout: float) -> None:
        """Stop polling, let calls in flight finish, commit, leave the group: within `timeout`.

        The final commit gets at least LEAVE_SECONDS, taken from the calls' share.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        self._stopping.set()
        if self._task is not None:  # a loop that died was reported by _poll_ended
            await asyncio.gather(self._task, return_exceptions=True)
        ladder = asyncio.create_task(self._ladder.stop(max(0.0, timeout - LEAVE_SECONDS)))
        tasks = [t for p in self._partitions.values() for t in p.tasks]
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=max(0.0, timeout - LEAVE_SECONDS))
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            if unfinished:
                log.warning(
                    "%s: %d calls unfinished at shutdown; they will be delivered again",
                    self.name,
                    len(unfinished),
                )
        # Only now: the shares follow the members still draining (this one still holds
        # its partitions and reports them). Stopped before the drain, a member that had
        # just joined kept the no-slot share it started with, and its read calls waited
        # out the whole shutdown timeout undelivered.
        await self._budget.stop()
        await self._states.settle()
        left = deadline - asyncio.get_running_loop().time()
        await asyncio.gather(self._leave(max(LEAVE_SECONDS, left)), ladder)
        await self._client.close()

    async def _leave(self, timeout: float) -> None:
        """Commit what finished and leave the group, off the event loop and bounded."""
        self._leaving = True
        if not await leave_off_loop(self.name, self._commit_and_close, timeout):
            log.warning(
                "%s: Kafka did not confirm the final commit within %.0f s; the calls "
                "it covered will be delivered again",
                self.name,
                timeout,
            )

    def _commit_and_close(self) -> None:
        self._commit(asynchronous=False)
        self._kafka.close()

    # ------------------------------------------------------------ polling
    async def _poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_commit = loop.time() + COMMIT_INTERVAL_SECONDS
        full_since: float | None = None
        while not self._stopping.is_set():
            now = loop.time()
            room = self._room()
            full_since = (full_since or now) if room <= 0 else None
            messages = []
            # A full buffer skips consume() for a moment rather than pausing: a pause drops
            # librdkafka's prefetched messages, and refetching them costs more than waiting.
            # While paused, consume() still runs, to serve rebalances and stay in the group.
            if room > 0 or self._states.any_paused:
                messages = self._kafka.consume(
                    num_messages=max(1, min(POLL_BATCH, room)), timeout=0
                )
            for message in messages:
                self._accept(message)
            self._steer(stalled=full_since is not None and now - full_since >= STALL_SECONDS)
            if now >= next_commit:
                self._commit(asynchronous=True)
                self._shields.publish()
                next_commit = now + COMMIT_INTERVAL_SECONDS
            await asyncio.sleep(0 if messages else IDLE_POLL_SECONDS)

    def _buffered(self) -> int:
        """Calls read and not finished, those read back from the delay topics included:
        they too are held for their destination (in the group's `held`) or working."""
        return sum(len(p.offsets) for p in self._partitions.values()) + self._ladder.buffered

    def _working(self) -> int:
        """Calls buffered and not held, for their destination or behind an earlier call of
        their key: they count against maxBuffered."""
        return self._buffered() - self._counters.held - self._counters.orderingHeld

    def _room(self) -> int:
        """Calls the buffer takes now: none once it holds maxBuffered working calls or
        BUFFER_BYTES of calls, held ones included."""
        if self._buffered_bytes >= BUFFER_BYTES:
            return 0
        return self.config.max_buffered - self._working()

    def _unbuffer(self, size: int, _task: asyncio.Task[None]) -> None:
        self._buffered_bytes -= size  # finished or cancelled: the record is let go either way

    def _accept(self, message: Message) -> None:
        if message.error() is not None:
            log.warning("%s: consume error: %s", self.name, message.error().str())
            return
        partition = self._partitions.get(message.partition())
        if partition is None:  # a straggler from a partition just taken away
            return
        partition.offsets.track(message.offset())
        self._counters.handleMessage += 1
        size = len(message.value() or b"")
        self._buffered_bytes += size
        # Chained now, as read: read order is the key's acceptance order.
        ordered = is_ordered(self.config, message)
        turn = partition.chains.turn(message.key()) if ordered else UNORDERED
        task = asyncio.create_task(self._handle(message, partition, turn))
        partition.tasks.add(task)
        task.add_done_callback(partition.tasks.discard)
        task.add_done_callback(partial(self._unbuffer, size))

    def _steer(self, stalled: bool) -> None:
        """Pause every partition while destinations hold maxHeld calls, keys hold maxBuffered
        calls behind their heads, or the buffer stays full.

        Resuming waits until all are half empty, so a slow group does not flap
        between pause and resume on every finished call; meanwhile /stats shows
        the first reason still over its half.
        """
        paused = self._states.any_paused
        max_buffered = self.config.max_buffered
        for count, bound, reason in (
            (self._counters.held, self.config.destination.max_held, HELD),
            (self._counters.orderingHeld, max_buffered, ORDERING),
        ):
            if count >= bound or (paused and count > bound // 2):
                self._states.hold(reason)
                return
        full = stalled or (
            paused
            and (self._working() > max_buffered // 2 or self._buffered_bytes > BUFFER_BYTES // 2)
        )
        self._states.hold(BUFFER if full else None)

    # ------------------------------------------------------------ one call
    async def _handle(self, message: Message, partition: _Partition, turn: Turn) -> None:
        async with turn:  # an ordered call: once the call of its key before it has finished
            await self._process(message)
        partition.offsets.finish(message.offset())

    async def _process(self, message: Message) -> None:
        """Deliver, dead-letter or park one record, of the call topic or a delay topic."""
        value = message.value()
        try:
            call = (
                decode_go_record(value, message.topic(), message.partition(), message.offset())
                if is_go_record(value)
                else decode_call(value)
            )
        except InvalidRecord as exc:
            self._counters.invalidMessage += 1
            log.warning(
                "%s: skipping invalid record at %d/%d: %s",
                self.name,
                message.partition(),
                message.offset(),
                exc,
            )
            await self._dead_letter(message, None, None, f"invalid record: {exc}")
        else:
            # A call sent again for another group of this topic (bigpipe.redrive) is not ours.
            finished = False
            if call.group is not None and call.group != self.config.group_id:
                pass
            elif call.idempotency_key is not None and not await self._is_first(call):
                self._counters.duplicateSkipped += 1  # a copy of a keyed call: bigpipe.calls.dedup
            else:
                finished = await self._deliver(message, call)
            if finished and call.group is None:
                # Delivered or dead-lettered: the call's whole stay, on the accepting node's
                # clock. A call sent again would count its days in a dead-letter topic.
                self._latencies.end_to_end.observe(max(0.0, time.time() - call.created_ms / 1000))

    async def _deliver(self, message: Message, call: Call) -> bool:
        """Deliver or dead-letter the call; False when it went to wait in a delay topic:
        for its delay, a backoff, or its destination (an open breaker, a Retry-After).

        An ordered call waits in memory instead: see bigpipe.delivery.ordering for why.
        """
        may_park = not is_ordered(self.config, message)
        parks = may_park and self._ladder.should_park(call)
        if parks and await self._ladder.park(call, message.key()):
            return False
        await Due.wait(call)
        try:
            outcome = await self._client.deliver(call, may_park)
        except Exception as exc:
            if _cancelling():  # an error raised while cancelled: the call is owed, not failed
                raise asyncio.CancelledError from exc
            # A bug here must not wedge the partition's commit point: dead-letter the call.
            log.exception("%s: delivering call %s failed unexpectedly", self.name, call.id)
            outcome = Outcome(
                False, 0, AttemptResult(Verdict.FINAL, error=f"internal: {exc!r}"), None
            )
        if outcome.wait_s is not None:  # a wait too long to wait here: wait in Kafka
            call.attempts, call.due_ms = outcome.attempts, now_ms() + round(outcome.wait_s * 1000)
            return await self._deliver(message, call)
        self._counters.rpcTotal += 1
        if outcome.delivered:
            self._counters.rpcSuccess += 1
            await self._report(call, outcome, None)
            return True
        self._counters.rpcFail += 1
        log.debug(
            "%s: call %s failed after %d attempts: %s",
            self.name,
            call.id,
            outcome.attempts,
            outcome.last.error,
        )
        await self._dead_letter(message, call, outcome, outcome.last.error)
        await self._report(call, outcome, self.config.dead_letter_topic)
        return True

    async def _report(self, call: Call, outcome: Outcome, dead_letter_topic: str | None) -> None:
        if call.callbacks:  # bigpipe.calls.callbacks
            topic, group_id = self.config.topic, self.config.group_id
            await send_callback(
                lambda: self.producer, topic, group_id, call, outcome, dead_letter_topic
            )

    async def _dead_letter(
        self, message: Message, call: Call | None, outcome: Outcome | None, reason: str
    ) -> None:
        topic, group_id = self.config.dead_letter_topic, self.config.group_id
        placed = await self._dead_letters.write(topic, group_id, message, call, outcome, reason)
        if call is not None:
            self._trail.dead(call, dead_letter_reason(call, outcome), reason, topic, placed)

    # ------------------------------------------------------------ offsets
    def _commit(self, asynchronous: bool, only: list[int] | None = None) -> None:
        offsets = []
        for number, partition in self._partitions.items():
            offset = partition.offsets.to_commit()
            if offset is not None and (only is None or number in only):
                offsets.append(TopicPartition(self.config.topic, number, offset))
                partition.offsets.committed(offset)
        if not offsets:
            return
        try:
            self._kafka.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            # Not fatal: the calls are delivered again by whoever owns the partition next.
            log.warning("%s: commit failed: %s", self.name, exc.args[0].str())

    # ------------------------------------------------------------ rebalance callbacks
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[tp.partition] = _Partition(KeyChains(self._counters))
        consumer.incremental_assign(partitions)
        self._states.assigned([tp.partition for tp in partitions])
        self._budget.assignment_changed()
        if partitions:  # a cooperative rebalance often assigns nothing new to this member
            log.info("%s: assigned partitions %s", self.name, [tp.partition for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        self._cancel(numbers)
        # Not a blocking commit: this runs on the event loop, and mid-rebalance the group
        # coordinator may answer only after seconds. At worst the commit is refused and
        # the next owner delivers those calls again.
        self._commit(asynchronous=True, only=numbers)
        self._forget(consumer, partitions)
        log.info("%s: revoked partitions %s", self.name, numbers)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own these already: committing now could skip its work.
        self._cancel([tp.partition for tp in partitions])
        self._forget(consumer, partitions)
        log.warning("%s: lost partitions %s", self.name, [tp.partition for tp in partitions])

    def _cancel(self, numbers: list[int]) -> None:
        if self._leaving:
            return
        for number in numbers:
            partition = self._partitions.get(number)
            for task in list(partition.tasks) if partition else []:
                task.cancel()

    def _forget(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions.pop(tp.partition, None)
            self._counters.lag.pop(str(tp.partition), None)  # its new owner reports it
        self._states.removed([tp.partition for tp in partitions])
        if not self._leaving:
            self._budget.assignment_changed()
        consumer.incremental_unassign(partitions)

    def _on_statistics(self, raw: str) -> None:
        topic = orjson.loads(raw).get("topics", {}).get(self.config.topic, {})
        lag = {}
        for number, state in topic.get("partitions", {}).items():
            if number == "-1" or int(number) not in self._partitions:
                continue
            high = self._states.high_watermark(int(number), state["hi_offset"])
            if high >= 0:
                lag[number] = _lag(state, high)
        self._counters.lag = lag
        if not self._stopping.is_set():  # else close() may serve this, on the leave thread
            self._states.refresh_high_watermarks()

    def _holding(self) -> Holding:
        """This member's partitions and their backlog, for the budget: the calls read and
        unfinished, and those not read yet (past its position, up to the high watermark
        its fetches brought). Local figures only: no request to Kafka."""
        backlog = {}
        for tp in self._kafka.position(self._states.topic_partitions(self._partitions)):
            try:
                _, fetched = self._kafka.get_watermark_offsets(tp, cached=True)
            except KafkaException:  # nothing fetched from it yet
                fetched = -1
            high = self._states.high_watermark(tp.partition, fetched)
            unread = high - tp.offset if tp.offset >= 0 and high > tp.offset else 0
            backlog[tp.partition] = unread + len(self._partitions[tp.partition].offsets)
        return Holding(sorted(self._partitions), backlog)

    def _on_error(self, error: KafkaError) -> None:
        if (text := self._repeats(error)) is not None:
            log.warning("%s: kafka: %s", self.name, text)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Un-mark what Kafka refused, so the next commit round sends it again.

        _commit marks offsets committed when it sends them; without this, a partition
        whose commit was refused (say, mid-rebalance) and that then sat idle would never
        commit again, and its next owner would deliver those calls twice.
        """
        if error is not None and error.code() == KafkaError._NO_OFFSET:
            return
        for tp in partitions:
            failed = error if error is not None else tp.error
            partition = self._partitions.get(tp.partition)
            if failed is not None and partition is not None:
                partition.offsets.commit_failed(tp.offset)
        if error is None:
            return
        # A commit racing a rebalance is refused; it is sent again if this member keeps
        # the partition, else its next owner delivers the calls it covered again.
        level = logging.INFO if error.code() in REBALANCE_ERRORS else logging.WARNING
        log.log(level, "%s: commit failed: %s", self.name, error.str())


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _lag(partition: dict[str, Any], high: int) -> int:
    """Calls in a partition after the committed offset.

    librdkafka says -1 while nothing was ever committed; the backlog then starts at
    the partition's first offset, since new groups read from the earliest.
    """
    committed = partition["committed_offset"]
    start = committed if committed >= 0 else max(partition["lo_offset"], 0)
    return max(0, high - start)
