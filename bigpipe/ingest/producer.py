"""Durable writes to Kafka, awaited from asyncio.

librdkafka reports deliveries from `poll()`. One thread blocks in `poll()`,
with the GIL released, and wakes the moment an acknowledgement arrives; the
callbacks it serves only queue the result, and the event loop resolves each
batch with one `call_soon_threadsafe`. Polling from the event loop instead
would mean either waiting out a timer on every acknowledgement (uvloop's
timers tick in whole milliseconds) or spinning a core while calls are pending.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KafkaProducer

from bigpipe.config import Config
from bigpipe.delivery.retry import backoff_seconds
from bigpipe.ingest.record_limits import RecordLimits, alone_size
from bigpipe.kafka import client_settings, producer_settings
from bigpipe.kafka_client import RepeatFilter

log = logging.getLogger(__name__)

Placed = tuple[int, int]  # (partition, offset) of a stored record
# A write's result, queued for the loop: its future, and the error or where Kafka put it.
Ack = tuple[asyncio.Future[Placed], KafkaError | None, Message]

UNPLACED = "Kafka acknowledged the write without saying where it is stored; it may not be"
POLL_SECONDS = 0.1  # how long the poll thread blocks when nothing happens
DEADLINE_SWEEP_SECONDS = 0.05  # how late past its timeout a write may be failed


# Kafka refuses these records for good: retrying the same record cannot help. Every other
# error (timeouts, lost connections, a leader election, a purge) may pass. librdkafka's
# KafkaError.retriable() and .fatal() are set only on the transactional API's errors,
# never on a delivery report's, so the codes decide.
TOO_LARGE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
PERMANENT_ERRORS = TOO_LARGE_ERRORS | frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_EXCEPTION,  # an invalid topic name
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError._INVALID_ARG,
    }
)


class ProduceFailed(Exception):
    """Kafka did not take the write.

    `permanent`: Kafka refused this record for good (too large, not authorised, ...) and
    stored nothing; retrying it cannot help. Otherwise the record may or may not be
    stored, and a retry may get through.
    """

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT_ERRORS

    @property
    def too_large(self) -> bool:
        return self.code in TOO_LARGE_ERRORS


class Producer:
    def __init__(self, config: Config) -> None:
        self._loop = asyncio.get_running_loop()
        self._kafka = KafkaProducer({**producer_settings(config), "error_cb": self._on_error})
        self._pending = 0  # touched on the event loop only
        self._closed = False  # close() began: no write is taken any more
        self._idle = asyncio.Event()
        self._idle.set()
        # When librdkafka last said every broker is down; None once a probe got through.
        # Written by the error callback, read by the node's Kafka watch (app.py).
        self.all_brokers_down_at: float | None = None
        self._repeats = RepeatFilter()
        self._acks: deque[Ack] = deque()  # appended by the poll thread, drained on the loop
        self._queue_ack = partial(_queue_ack, self._acks.append)
        self._deadlines: deque[tuple[float, asyncio.Future[Placed]]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._limits = RecordLimits(client_settings(config))
        # Writes refused as too large that fit alone, written once more (see _write_alone).
        self._written_again: set[asyncio.Future[Placed]] = set()
        self._learning: set[asyncio.Task[None]] = set()
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll_forever, name="kafka-acks", daemon=True)
        self._poller.start()

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, timeout: float | None = None
    ) -> Placed:
        """Write one record; once Kafka has acknowledged it (acks=all), return where it is.

        Past `timeout` s without an answer (checked every DEADLINE_SWEEP_SECONDS), raise
        ProduceFailed; the record may still land. A closed producer fails every write at
        once: nobody polls it any more, so a write to it would never be answered.
        """
        return await self.write(topic, value, key, timeout)

    def write(
        self, topic: str, value: bytes, key: bytes | None = None, timeout: float | None = None
    ) -> asyncio.Future[Placed]:
        """Hand one record to Kafka now; the future is `send`'s answer (where Kafka put it,
        or ProduceFailed). Many writes made before any is awaited go out together."""
        future: asyncio.Future[Placed] = self._loop.create_future()
        if self._closed:
            future.set_exception(
                ProduceFailed("the producer is closed (replaced by a reload, or stopping)")
            )
            return future
        limit = self._limits.known(topic)
        if limit is not None and alone_size(value, key) > limit:  # never let it join a batch
            future.set_exception(_over_limit(topic, alone_size(value, key), limit))
            return future
        if self._produce(future, topic, value, key):
            self._count_pending(future, timeout)
        return future

    def _produce(
        self, future: asyncio.Future[Placed], topic: str, value: bytes, key: bytes | None
    ) -> bool:
        """Hand the record to librdkafka; False (and the future failed) if it refused it."""
        try:
            self._kafka.produce(topic, value, key, on_delivery=partial(self._queue_ack, future))
        except BufferError as exc:
            future.set_exception(ProduceFailed(f"local queue refused the write: {exc}"))
            return False
        except KafkaException as exc:
            error = exc.args[0]
            future.set_exception(ProduceFailed(f"refused the write: {error.str()}", error.code()))
            return False
        return True

    def _count_pending(self, future: asyncio.Future[Placed], timeout: float | None) -> None:
        if self._pending == 0:
            self._idle.clear()
        self._pending += 1
        if timeout is not None:
            self._deadlines.append((self._loop.time() + timeout, future))
            if self._sweeper is None:
                self._sweeper = self._loop.call_later(DEADLINE_SWEEP_SECONDS, self._sweep)

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` s for pending writes, then stop polling.

        Writes still pending then fail (transient: they may or may not be stored), so
        nobody waits forever on a producer that is gone: a dead letter written through a
        producer a reload replaced is written again through the new one.
        """
        self._closed = True
        try:
            if self._pending:  # asked with no time left, wait_for times out even when idle
                await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("producer: %d writes still unacknowledged at shutdown", self._pending)
        self._stopping.set()
        await asyncio.to_thread(self._poller.join, POLL_SECONDS * 2)
        if self._pending:
            self._kafka.purge()  # each pending write gets a _PURGE_* delivery report...
            self._kafka.poll(0)  # ...served here, on the loop: the poll thread has ended
            self._resolve_acks()

    def probe(self, timeout: float) -> bool:
        """Does a broker answer a metadata request within `timeout` s? Blocking: use a thread."""
        try:
            self._kafka.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    def _poll_forever(self) -> None:
        """The poll thread: serve librdkafka's callbacks, hand acknowledgements to the loop."""
        while not self._stopping.is_set():
            self._kafka.poll(POLL_SECONDS)
            if self._acks:
                try:
                    self._loop.call_soon_threadsafe(self._resolve_acks)
                except RuntimeError:  # the loop closed under us: nobody is waiting any more
                    return

    def _resolve_acks(self) -> None:
        acks = self._acks
        while acks:
            future, error, message = acks.popleft()
            if error is not None and self._may_fit_alone(future, error):
                self._learn_then_write_alone(future, message, error)  # still pending
                continue
            if self._written_again:
                self._written_again.discard(future)
            self._pending -= 1
            if future.done():  # the caller went away; its write still stands
                continue
            offset = message.offset()
            if error is None and offset is not None and offset >= 0:
                future.set_result((message.partition(), offset))
            elif error is None:
                # librdkafka reports a write the broker called a duplicate (its sequence
                # seen before) as done with no offset. On a broker started a moment
                # before, such a write was then not in the topic (tests/faults/
                # test_fresh_broker.py): never answer it as stored; a retry is safe.
                future.set_exception(ProduceFailed(UNPLACED))
            elif error.code() in TOO_LARGE_ERRORS:  # a second time, though it fits alone
                future.set_exception(_batch_too_large(error, message, self._limits))
            else:
                future.set_exception(ProduceFailed(error.str(), error.code()))
        if self._pending == 0:
            self._idle.set()

    def _may_fit_alone(self, future: asyncio.Future[Placed], error: KafkaError) -> bool:
        """Refused as too large the first time: a larger record in its batch may be why."""
        return (
            error.code() in TOO_LARGE_ERRORS
            and not future.done()
            and future not in self._written_again
        )

    def _learn_then_write_alone(
        self, future: asyncio.Future[Placed], message: Message, error: KafkaError
    ) -> None:
        task = self._loop.create_task(self._write_alone(future, message, error))
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    async def _write_alone(
        self, future: asyncio.Future[Placed], message: Message, error: KafkaError
    ) -> None:
        """A write Kafka refused as too large: refuse it for good if it is over the topic's
        limit on its own; write it once more if it fits (a larger record in its batch
        took it down, bigpipe.ingest.record_limits). Until then it is still pending."""
        topic, value, key = message.topic() or "", message.value() or b"", message.key()
        limit = await self._limits.learn(topic)
        size = alone_size(value, key)
        if limit is not None and size <= limit and not future.done() and not self._closed:
            self._written_again.add(future)
            if self._produce(future, topic, value, key):
                return
            self._written_again.discard(future)
        self._pending -= 1
        if not future.done():
            if limit is None:  # Kafka did not say: its refusal stands
                future.set_exception(ProduceFailed(error.str(), error.code()))
            elif size > limit:
                future.set_exception(_over_limit(topic, size, limit))
            else:
                future.set_exception(ProduceFailed("the producer closed before a retry"))
        if self._pending == 0:
            self._idle.set()

    def _sweep(self) -> None:
        """Fail the writes past their deadline: one timer for all of them, not one per write
        (a timer per call was ~3% of ingest CPU). Every write with a deadline has the same
        timeout (`http.server.write.timeout`, which a reload does not change), so the
        deadlines come in the order the writes were made."""
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][1].done() or deadlines[0][0] <= now):
            _, future = deadlines.popleft()
            if not future.done():
                future.set_exception(ProduceFailed("no acknowledgement in time"))
        self._sweeper = (
            self._loop.call_later(DEADLINE_SWEEP_SECONDS, self._sweep) if deadlines else None
        )

    def _on_error(self, error: KafkaError) -> None:
        # Served by poll() on the poll thread. librdkafka recovers from these by itself.
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # Kafka went away (or its connections idled out): the node's watch probes it.
            self.all_brokers_down_at = time.monotonic()
        if (text := self._repeats(error)) is not None:
            log.warning("kafka producer: %s", text)


async def write_until_stored(
    producer: Callable[[], Producer],
    topic: str,
    value: bytes,
    key: bytes | None,
    backoff_ms: tuple[int, int],
    on_retry: Callable[[ProduceFailed], None] | None = None,
) -> Placed:
    """Write one record until Kafka has it; return where it is. Raise ProduceFailed
    (permanent) if Kafka refuses it for good: no retry of this record can help.

    Each try goes through `producer()`, the producer in place now: a reload replaces it
    and closes the old one, whose writes then fail at once. A transient failure is told
    to `on_retry` and tried again after a backoff in [`backoff_ms`] (base, max).
    """
    failures = 0
    while True:
        try:
            return await producer().send(topic, value, key)
        except ProduceFailed as exc:
            if exc.permanent:
                raise
            failures += 1
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(backoff_seconds(failures, *backoff_ms))


def _over_limit(topic: str, size: int, limit: int) -> ProduceFailed:
    return ProduceFailed(
        f"the call takes {size} bytes, over topic {topic}'s max.message.bytes of {limit}",
        KafkaError.MSG_SIZE_TOO_LARGE,
    )


def _batch_too_large(error: KafkaError, message: Message, limits: RecordLimits) -> ProduceFailed:
    """Refused as too large again though it fits alone: the records written with it are
    over the limit together (a topic's max.message.bytes under librdkafka's batch.size).
    Transient: the next batch may be smaller."""
    limit = limits.known(message.topic() or "")
    return ProduceFailed(
        f"{error.str()}: Kafka refused the record batch the call was written in (over "
        f"max.message.bytes {limit}); the call alone fits, so a retry may pass"
    )


def _queue_ack(
    append: Callable[[Ack], None],
    future: asyncio.Future[Placed],
    error: KafkaError | None,
    message: Message,
) -> None:
    """A write's delivery callback, bound with functools.partial (cheaper than an object per
    write). It runs on the poll thread, so it only queues the result for the event loop."""
    append((future, error, message))  # deque.append is atomic: no lock needed
