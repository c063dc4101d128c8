"""The errno table's timing rows, against a real node: a slow body gets 408, and Kafka not
acknowledging in time gets 503 with errno 1 ("retry later"), seen by a real HTTP caller."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    base_config,
    eventually,
    free_port,
    own_kafka,
    topic_record_count,
    unique,
)

READ_TIMEOUT_MS = 1000
ACK_TIMEOUT_MS = 1500


def call_body(url: str = "http://127.0.0.1:1/hook") -> bytes:
    return orjson.dumps({"acl": {"name": ACL_NAME, "secret": ACL_SECRET}, "url": url, "data": "d"})


def read_reply(sock: socket.socket) -> tuple[int, dict]:
    """Read one HTTP/1.1 reply with a Content-Length body: its status and its JSON."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a reply: {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-reply"
        body += chunk
    return int(lines[0].split()[1]), orjson.loads(body[:length])


def slow_body_request(port: int, body: bytes) -> tuple[int, dict, float]:
    """Send the headers and half the body, then nothing: the reply, and how long it took."""
    half = len(body) // 2
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /rpc/call HTTP/1.1\r\nHost: bigpipe\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:half]
        )
        started = time.monotonic()
        status, reply = read_reply(sock)
        return status, reply, time.monotonic() - started


async def test_a_body_slower_than_the_read_timeout_gets_408_and_writes_nothing(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    topic = unique("errno-408")
    config = base_config(kafka, topic, free_port(), **{"http.server.read.timeout": READ_TIMEOUT_MS})
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    status, reply, waited = await asyncio.to_thread(slow_body_request, bigpipe.port, call_body())
    print(f"\n408: replied after {waited:.2f} s (read timeout {READ_TIMEOUT_MS} ms)")
    assert (status, reply["errno"], reply["data"]) == (408, -1, None), reply
    assert "http.server.read.timeout" in reply["msg"]
    assert READ_TIMEOUT_MS / 1000 * 0.9 <= waited < READ_TIMEOUT_MS / 1000 + 5
    assert topic_record_count(kafka, topic) == 0, "a refused call writes nothing"


# ---------------------------------------------------------------- kafka too slow
@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    async with own_kafka(tmp_path / "kafka") as broker:
        yield broker


async def test_kafka_not_acknowledging_in_time_gets_503_errno_1_then_calls_flow_again(
    own_broker: tuple[str, int],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """The broker is frozen (SIGSTOP): its connections stay open, it answers nothing. The
    caller must get errno 1 once `kafka.producer.ack.timeout` has passed, not wait for ever,
    and not get a false errno 0; once the broker runs again, calls are accepted again."""
    bootstrap, broker_pid = own_broker
    topic = unique("errno-503")
    config = base_config(
        bootstrap,
        topic,
        free_port(),
        **{"kafka.producer.ack.timeout": ACK_TIMEOUT_MS, "http.server.write.timeout": 10_000},
    )
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    status, reply = await bigpipe.post_call(http)
    assert (status, reply["errno"]) == (200, 0), "accepted while the broker runs"

    os.kill(broker_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, reply = await bigpipe.post_call(http)
        waited = time.monotonic() - started
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    print(f"\n503: replied after {waited:.2f} s (ack timeout {ACK_TIMEOUT_MS} ms): {reply}")
    assert (status, reply["errno"], reply["data"]) == (503, 1, None), reply
    assert reply["msg"].startswith("kafka did not take the call"), reply
    assert ACK_TIMEOUT_MS / 1000 * 0.9 <= waited < ACK_TIMEOUT_MS / 1000 + 5
    stats = await bigpipe.stats(http)
    assert stats["producerStats"][topic] == {"deliverySuccess": 1, "deliveryFail": 1}
    assert stats["serverStats"]["acceptedCall"] == 1

    async def accepted_again() -> bool:  # errno 1 means "retry later": so a caller retries
        status, reply = await bigpipe.post_call(http)
        return (status, reply["errno"]) == (200, 0)

    await eventually(accepted_again, 30, "a call accepted once the broker answers again")
