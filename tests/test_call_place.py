"""The errno-0 reply says where Kafka put the call: data.partition and data.offset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
from confluent_kafka import Consumer, TopicPartition

from tests.support import Bigpipe, start_node, unique


def record_at(bootstrap: str, topic: str, partition: int, offset: int) -> bytes:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("probe")})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        message = consumer.poll(30)
        assert message is not None and message.error() is None
        return message.value()
    finally:
        consumer.close()


async def test_the_reply_names_the_calls_partition_and_offset(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], http: aiohttp.ClientSession
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes, partitions=3)
    for n in range(6):
        status, reply = await bigpipe.post_call(http, f"call {n}", partition_key=f"k{n}")
        assert status == 200
        data = reply["data"]
        value = await asyncio.to_thread(record_at, kafka, topic, data["partition"], data["offset"])
        assert orjson.loads(value)["id"] == data["id"]
