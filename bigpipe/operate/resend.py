"""Write calls back to Kafka for the operator commands, in paced batches, each batch
confirmed by Kafka before the next begins. Blocking."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

from confluent_kafka import KafkaError, Message, Producer

from bigpipe.config import Config
from bigpipe.kafka import producer_settings
from bigpipe.operate.commands import Failed

BATCH = 100
FLUSH_SECONDS = 60.0
Item = TypeVar("Item")
Record = tuple[str, bytes, bytes | None]  # topic, value, key


class ResendFailed(Failed):
    """Kafka did not take some records; what it took stays taken. A Failed: the command
    says so in one line and exits 1."""


class Resender:
    def __init__(self, config: Config) -> None:
        self._producer = Producer(producer_settings(config))
        self._failures: list[str] = []

    def send(self, records: Sequence[Record], what: str) -> None:
        """Write the records; return once Kafka has every one, else raise ResendFailed."""
        for topic, value, key in records:
            self._producer.produce(topic, value, key, on_delivery=self._on_delivery)
        if self._producer.flush(FLUSH_SECONDS) > 0:
            raise ResendFailed(f"Kafka did not take {what} within {FLUSH_SECONDS:.0f} s")
        if self._failures:
            raise ResendFailed(f"Kafka refused {what}: {self._failures[0]}")

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self._failures.append(error.str())


def paced(items: Iterable[Item], rate: float | None) -> Iterator[list[Item]]:
    """The items in batches, read as they come; with a rate (items a second), each batch
    waits its turn."""
    size = BATCH if rate is None else max(1, min(BATCH, int(rate)))
    started = time.monotonic()
    items = iter(items)
    sent = 0
    while batch := list(islice(items, size)):
        if rate is not None:
            time.sleep(max(0.0, started + sent / rate - time.monotonic()))
        yield batch
        sent += len(batch)
