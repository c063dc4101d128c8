"""Durable writes to Kafka, awaited from asyncio.

librdkafka reports deliveries from `poll()`. One thread polls; its delivery
callbacks only queue results, and one `call_soon_threadsafe` per poll hands a
whole batch to the event loop, so there is no thread hop per message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KafkaProducer

from bigpipe.config import Config
from bigpipe.kafka import RepeatFilter, client_settings, record_size_limit

log = logging.getLogger(__name__)


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
        self._results: deque[tuple[asyncio.Future[None], KafkaError | None]] = deque()
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = threading.Event()
        # When librdkafka last said every broker is down; None once a probe got through.
        # Written on the poll thread, read by the node's Kafka watch (app.py).
        self.all_brokers_down_at: float | None = None
        self._repeats = RepeatFilter()
        self._thread = threading.Thread(
            target=self._poll_forever, name="kafka-producer", daemon=True
        )
        self._thread.start()

    @property
    def pending(self) -> int:
        """Writes handed to Kafka and not yet acknowledged or failed."""
        return self._pending

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Write one record and return once Kafka has acknowledged it (acks=all)."""
        future: asyncio.Future[None] = self._loop.create_future()
        try:
            self._kafka.produce(topic, value, key, on_delivery=_Delivery(self._results, future))
        except (BufferError, KafkaException) as exc:
            raise ProduceFailed(f"local queue refused the write: {exc}") from None
        self._pending += 1
        self._idle.clear()
        await future

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` s for pending writes, then stop polling."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("producer: %d writes still unacknowledged at shutdown", self._pending)
        self._stopping.set()
        await asyncio.to_thread(self._thread.join)

    def probe(self, timeout: float) -> bool:
        """Does a broker answer a metadata request within `timeout` s? Blocking: use a thread."""
        try:
            self._kafka.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            self._kafka.poll(0.1)
            if self._results:
                self._loop.call_soon_threadsafe(self._resolve_results)

    def _resolve_results(self) -> None:
        while self._results:
            future, error = self._results.popleft()
            self._pending -= 1
            if future.done():  # the caller went away; its write still stands
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(ProduceFailed(error.str()))
        if self._pending == 0:
            self._idle.set()

    def _on_error(self, error: KafkaError) -> None:
        # Runs on the poll thread. librdkafka recovers from these by itself; say so once each.
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # Kafka went away (or its connections idled out): the node's watch probes it.
            self.all_brokers_down_at = time.monotonic()
        if (text := self._repeats(error)) is not None:
            log.warning("kafka producer: %s", text)


class _Delivery:
    """The delivery callback of one write; runs on the poll thread, so it only queues."""

    __slots__ = ("_future", "_results")

    def __init__(
        self,
        results: deque[tuple[asyncio.Future[None], KafkaError | None]],
        future: asyncio.Future[None],
    ) -> None:
        self._results = results
        self._future = future

    def __call__(self, error: KafkaError | None, _message: Message) -> None:
        self._results.append((self._future, error))
