"""At ingest, a call Kafka refuses for good is answered "retrying cannot help", not the
"retry later" of a Kafka that did not answer in time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from confluent_kafka import KafkaError

from bigpipe.ingest.producer import ProduceFailed
from bigpipe.ingest.server import _produce_refusal
from tests.support import Bigpipe, base_config, create_topic, free_port, unique


async def test_a_call_larger_than_its_topic_accepts_gets_413_not_retry_later(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    topic = unique("calls")
    await asyncio.to_thread(create_topic, kafka, topic, **{"max.message.bytes": "2000"})
    bigpipe = await Bigpipe(base_config(kafka, topic, free_port(), partitions=1), tmp_path).start()
    processes.append(bigpipe)
    status, reply = await bigpipe.post_call(http, data="x" * 5000)
    print(f"\ntoo large for the topic: HTTP {status} errno {reply['errno']}: {reply['msg']}")
    assert (status, reply["errno"]) == (413, -1), reply
    assert "retrying cannot help" in reply["msg"] and topic in reply["msg"]
    status, reply = await bigpipe.post_call(http, data="small")
    assert (status, reply["errno"]) == (200, 0), "the topic takes calls that fit"


def test_kafka_errors_map_to_retry_later_or_retrying_cannot_help() -> None:
    """Authorization needs a broker with ACLs; the mapping from Kafka's code is pinned here."""
    cases = {
        KafkaError.TOPIC_AUTHORIZATION_FAILED: (500, -1),
        KafkaError.MSG_SIZE_TOO_LARGE: (413, -1),
        KafkaError._MSG_TIMED_OUT: (503, 1),
        KafkaError._PURGE_INFLIGHT: (503, 1),
        None: (503, 1),  # no code: the sweep's "no acknowledgement in time", a full queue
    }
    for code, expected in cases.items():
        refusal = _produce_refusal(ProduceFailed("kafka says no", code), "t")
        assert (refusal.status, refusal.errno) == expected, code
