"""Units of bigpipe.ingest.record_limits: what a topic's max.message.bytes costs to learn."""

from __future__ import annotations

import asyncio
import threading

from bigpipe.ingest.record_limits import RecordLimits
from tests.support import eventually


async def test_writes_refused_together_ask_kafka_once_for_their_topics_limit() -> None:
    """A record batch of a hundred calls refused as too large makes a hundred writes ask
    for the limit at once: they share one describe_configs, not a hundred."""
    limits = RecordLimits({})
    asked: list[str] = []
    answer = threading.Event()

    def describe(topic: str) -> int:
        asked.append(topic)
        answer.wait(10)
        return 2000

    limits._describe = describe  # type: ignore[method-assign]  # Kafka stands aside
    waiting = [asyncio.ensure_future(limits.learn("calls")) for _ in range(100)]
    await eventually(lambda: asked, 5, "the first write to ask")  # every one has run by now
    answer.set()
    assert await asyncio.gather(*waiting) == [2000] * 100
    assert asked == ["calls"]
    assert limits.known("calls") == 2000
    assert await limits.learn("calls") == 2000 and asked == ["calls"]  # known: not asked
