"""Switch-over from the Go original: its backlog is delivered, its committed offsets honoured.

The records are written as the original's producer wrote them (server/handler.go,
kafka/producer.go, proto/message.go of owenliang/bigpipe): Go's json.Marshal of its
CallMessage struct (fields in declaration order, map keys sorted, HTML characters
escaped), no record key, and the partition picked by its own hash of partition_key.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from confluent_kafka import Consumer, Producer, TopicPartition

from bigpipe.ingest.compat import go_call_id
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    create_topic,
    eventually,
    free_port,
    unique,
)

PARTITIONS = 3
GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def go_marshal(message: dict) -> bytes:
    """Go's json.Marshal: compact, UTF-8 as is, <, >, & and U+2028/9 escaped."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    for char, escape in GO_ESCAPES.items():
        text = text.replace(char, escape)
    return text.encode()


def go_partition(partitions: int, key: str) -> int:
    """The original's getPartition for a non-empty key: a times-33 hash over the runes."""
    hashed = 0
    for char in key:
        hashed = (hashed * 33 + ord(char)) % partitions
    return hashed % partitions


def go_record(topic: str, url: str, data: str, key: str, headers: dict[str, list[str]]) -> tuple:
    partition = go_partition(PARTITIONS, key)
    message = {
        "Headers": dict(sorted(headers.items())),
        "Url": url,
        "Data": data,
        "Topic": topic,
        "Partition": partition,
        "CreateTime": 1712000000000,
    }
    return partition, go_marshal(message)


def write_go_records(bootstrap: str, topic: str, records: list[tuple[int, bytes]]) -> list:
    """Produce as the Go node did (no key, its own partition); return (partition, offset)s."""
    placed: list[tuple[int, int]] = []

    def report(error, message) -> None:
        assert error is None, error
        placed.append((message.partition(), message.offset()))

    producer = Producer({"bootstrap.servers": bootstrap})
    for partition, value in records:
        producer.produce(topic, value=value, partition=partition, on_delivery=report)
        producer.flush(30)  # one at a time, so `placed` is in the order written
    return placed


def commit_as_go_node(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """What the Go node's auto-commit left behind: the group's offsets on the topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p, offset) for p, offset in offsets.items()]
        consumer.commit(offsets=tps, asynchronous=False)
    finally:
        consumer.close()


async def test_a_go_nodes_backlog_is_delivered_byte_exact_from_its_committed_offsets(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    topic, group = unique("go-calls"), unique("go-group")
    await asyncio.to_thread(create_topic, kafka, topic, PARTITIONS)
    headers = {
        "Accept": ["*/*"],
        "Authorization": ["Bearer go-token"],
        "Content-Length": ["120"],
        "Content-Type": ["application/json"],
        "User-Agent": ["curl/7.58.0"],
        "X-Trace": ["trace-a", "trace-b"],
    }
    # Delivered by the Go node before the switch: committed, never to be delivered again.
    done = [
        go_record(topic, downstream.url("/done"), f"old {n}", f"user-{n}", headers)
        for n in range(6)
    ]
    placed_done = await asyncio.to_thread(write_go_records, kafka, topic, done)
    committed = {p: 0 for p in range(PARTITIONS)}
    for partition, offset in placed_done:
        committed[partition] = max(committed[partition], offset + 1)
    await asyncio.to_thread(commit_as_go_node, kafka, group, topic, committed)
    # Its backlog: accepted by the Go node, not yet delivered when it was stopped.
    bodies = [f'backlog {n}: héllo <b>&amp;</b> ✓ \u2028 "quoted" \\ {"x" * n}' for n in range(24)]
    backlog = [
        go_record(topic, downstream.url("/hook"), body, f"user-{n}", headers)
        for n, body in enumerate(bodies)
    ]
    placed = await asyncio.to_thread(write_go_records, kafka, topic, backlog)

    config = base_config(
        kafka, topic, free_port(), partitions=PARTITIONS, consumers=[consumer_entry(topic, group)]
    )
    processes.append(await Bigpipe(config, tmp_path).start())

    await eventually(lambda: len(downstream.requests) >= len(bodies), 60, "the Go backlog")
    expected_ids = {
        go_call_id(topic, p, o): body for (p, o), body in zip(placed, bodies, strict=True)
    }
    received = {r.call_id: r for r in downstream.requests}
    assert len(downstream.requests) == len(bodies), "each once, and none the Go node committed"
    assert set(received) == set(expected_ids), "exactly the backlog, with ids from its place"
    for call_id, request in received.items():
        assert request.body == expected_ids[call_id].encode(), "Data is the body, byte for byte"
        assert request.headers["Content-Type"] == "application/octet-stream"
        assert request.headers["X-Trace"] == "trace-a, trace-b"
        assert request.headers["User-Agent"] == "curl/7.58.0"
        assert "Authorization" not in request.headers, "credentials stay behind, as for ours"
