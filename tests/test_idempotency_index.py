"""The idempotency index's view, on a real broker: how soon it sees a record, and that an
index emptied by retention costs no wait."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from bigpipe.calls import dedup
from bigpipe.calls.dedup import IdempotencyIndex
from bigpipe.calls.envelope import new_call
from bigpipe.config import Config, parse_config
from bigpipe.ingest.producer import Producer
from tests.support import create_topic, unique
from tests.test_config import EXAMPLE

TIMEOUT = 5.0


@pytest.fixture
async def index_topic(kafka: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh index topic of its own, so that nothing else writes to it."""
    topic = unique("idem-index")
    await asyncio.to_thread(create_topic, kafka, topic)
    monkeypatch.setattr(dedup, "INDEX_TOPIC", topic)
    return topic


@pytest.fixture
async def config(kafka: str) -> Config:
    return parse_config({**EXAMPLE, "kafka.bootstrap.servers": kafka})


@pytest.fixture
async def producer(config: Config) -> AsyncIterator[Producer]:
    producer = Producer(config)
    yield producer
    await producer.close(5)


async def test_a_record_just_written_is_seen_within_milliseconds(
    index_topic: str, config: Config, producer: Producer
) -> None:
    """Every keyed call asks the view after a catch-up: the view's poll thread took
    records in batches of 500 or 200 ms, so each such call waited ~100 ms."""
    index = IdempotencyIndex(config)
    try:
        assert await index.first_at_ingest("caller", "warm-up", TIMEOUT) is None
        took = []
        for number in range(15):
            call = new_call("http://svc/h", "", "caller", {}, idempotency_key=f"k{number}")
            await index.record(producer, call, 60_000, TIMEOUT)
            started = time.monotonic()
            first = await index.first_at_ingest("caller", f"k{number}", TIMEOUT)
            took.append(time.monotonic() - started)
            assert first is not None and first.call_id == call.id
        median = statistics.median(took)
        print(f"\nindex catch-up: median {median * 1000:.1f} ms, max {max(took) * 1000:.1f} ms")
        assert median < 0.05, f"median catch-up {median * 1000:.0f} ms"
    finally:
        await index.close()


async def test_an_index_emptied_by_retention_answers_at_once(
    kafka: str, index_topic: str, config: Config, producer: Producer
) -> None:
    """Its records gone, the index starts past offset 0 with nothing to read: the view
    waited for offset 0 to reach the end, the whole timeout, on every keyed call."""
    for number in range(3):
        await producer.send(index_topic, b"{}", f"gone{number}".encode())
    admin = AdminClient({"bootstrap.servers": kafka})
    deleted = admin.delete_records([TopicPartition(index_topic, 0, 3)])
    [future] = deleted.values()
    await asyncio.to_thread(future.result, 30)
    index = IdempotencyIndex(config)
    try:
        started = time.monotonic()
        assert await index.first_at_ingest("caller", "k", TIMEOUT) is None
        took = time.monotonic() - started
        assert took < TIMEOUT / 2, f"{took:.1f} s for a miss on an empty index"
    finally:
        await index.close()


async def test_eviction_forgets_only_keys_whose_window_has_passed() -> None:
    index = IdempotencyIndex(parse_config(EXAMPLE))

    def apply(key: str, call_id: str, accepted_ms: int, window_ms: int) -> None:
        value = orjson.dumps({"id": call_id, "ts": accepted_ms, "w": window_ms})
        index._apply_one(orjson.dumps(["caller", key]), value)

    apply("short", "s", 1_000, 1_000)  # its window ends at 2,000
    apply("long", "l", 1_000, 10_000)  # at 11,000
    apply("again", "a1", 1_000, 1_000)  # at 2,000, then a new first until 3,500
    apply("again", "a2", 2_500, 1_000)
    index._evict(2_000)
    assert index._lookup("caller", "short", 1_500) is None
    assert index._lookup("caller", "long", 2_000).call_id == "l"
    assert index._lookup("caller", "again", 3_000).call_id == "a2"
    index._evict(3_500)
    assert index._lookup("caller", "again", 3_000) is None
    assert index._lookup("caller", "long", 3_500).call_id == "l"
