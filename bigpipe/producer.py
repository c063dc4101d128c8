"""Durable writes to Kafka, awaited from asyncio.

librdkafka reports deliveries from `poll()`. The event loop itself calls
`poll(0)`, which never blocks, so delivery callbacks resolve the callers'
futures directly: no thread, no hop, no lock. (A polling thread handing
batches over with `call_soon_threadsafe` measured 22% slower ingest.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KafkaProducer

from bigpipe.config import Config
from bigpipe.kafka import RepeatFilter, client_settings, record_size_limit

log = logging.getLogger(__name__)

PENDING_POLL_SECONDS = 0.0005
IDLE_POLL_SECONDS = 0.1


class ProduceFailed(Exception):
    """Kafka did not acknowledge the write; the record may or may not be stored."""


def producer_settings(config: Config) -> dict[str, Any]:
    return {
        **client_settings(config),
        "client.id": "bigpipe",
        # Idempotence gives acks=all and no duplicates or reordering from librdkafka's own
        # retries: "accepted" then means every in-sync replica has the call.
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": config.producer_ack_timeout_ms,
        # librdkafka insists on at least one retry when idempotence is on.
        "message.send.max.retries": max(1, config.producer_retries),
        "linger.ms": 2,
        "message.max.bytes": record_size_limit(config),
        "queue.buffering.max.messages": 4 * config.channel_size + 10_000,
        "socket.keepalive.enable": True,
    }


class Producer:
    def __init__(self, config: Config) -> None:
        self._loop = asyncio.get_running_loop()
        self._kafka = KafkaProducer({**producer_settings(config), "error_cb": self._on_error})
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # When librdkafka last said every broker is down; None once a probe got through.
        # Written by the error callback, read by the node's Kafka watch (app.py).
        self.all_brokers_down_at: float | None = None
        self._repeats = RepeatFilter()
        self._wakeup = asyncio.Event()
        self._poller = asyncio.create_task(self._poll_forever(), name="kafka producer poll")

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, timeout: float | None = None
    ) -> None:
        """Write one record and return once Kafka has acknowledged it (acks=all).

        Past `timeout` s without an answer, raise ProduceFailed; the record may still
        land. A plain timer, not asyncio.timeout: this is the ingest hot path.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        try:
            self._kafka.produce(topic, value, key, on_delivery=partial(self._delivered, future))
        except (BufferError, KafkaException) as exc:
            raise ProduceFailed(f"local queue refused the write: {exc}") from None
        self._pending += 1
        self._idle.clear()
        self._wakeup.set()
        if timeout is None:
            await future
            return
        timer = self._loop.call_later(timeout, _give_up, future)
        try:
            await future
        finally:
            timer.cancel()

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` s for pending writes, then stop polling."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("producer: %d writes still unacknowledged at shutdown", self._pending)
        self._poller.cancel()
        await asyncio.gather(self._poller, return_exceptions=True)

    def probe(self, timeout: float) -> bool:
        """Does a broker answer a metadata request within `timeout` s? Blocking: use a thread."""
        try:
            self._kafka.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    async def _poll_forever(self) -> None:
        """Serve librdkafka's callbacks on the event loop: no thread, no hop, no lock.

        poll(0) never blocks. While writes are pending it runs every half millisecond
        (at once again when it served something); otherwise ten times a second, for
        error reports.
        """
        while True:
            served = self._kafka.poll(0)
            if served:
                await asyncio.sleep(0)
            elif self._pending:
                await asyncio.sleep(PENDING_POLL_SECONDS)
            else:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL_SECONDS)

    def _delivered(
        self, future: asyncio.Future[None], error: KafkaError | None, _message: Message
    ) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()
        if future.done():  # the caller went away; its write still stands
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(ProduceFailed(error.str()))

    def _on_error(self, error: KafkaError) -> None:
        # Served by poll() on the event loop. librdkafka recovers from these by itself.
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # Kafka went away (or its connections idled out): the node's watch probes it.
            self.all_brokers_down_at = time.monotonic()
        if (text := self._repeats(error)) is not None:
            log.warning("kafka producer: %s", text)


def _give_up(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(ProduceFailed("no acknowledgement in time"))
