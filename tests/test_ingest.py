"""/rpc/call against a real broker: bad input is refused clearly and never reaches Kafka."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    base_config,
    free_port,
    topic_record_count,
    unique,
)

GOOD = {"acl": {"name": ACL_NAME, "secret": ACL_SECRET}, "url": "http://svc.test/hook", "data": "x"}


def with_(**changes: object) -> bytes:
    body = orjson.loads(orjson.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = body
        for parent in parents:
            target = target[parent]
        if value is DROP:
            target.pop(leaf)
        else:
            target[leaf] = value
    return orjson.dumps(body)


DROP = object()
BODY_LIMIT = 4096

BAD_INPUTS = [
    ("wrong secret", with_(acl__secret="nope"), 403, "acl refused"),
    ("unknown caller", with_(acl__name="nobody"), 403, "acl refused"),
    ("missing acl", with_(acl=DROP), 400, "field acl"),
    ("acl not an object", with_(acl="system-1"), 400, "field acl"),
    ("missing acl.name", with_(acl__name=DROP), 400, "field acl.name"),
    ("acl.name not a string", with_(acl__name=1), 400, "field acl.name"),
    ("missing acl.secret", with_(acl__secret=DROP), 400, "field acl.secret"),
    ("acl.secret not a string", with_(acl__secret=[]), 400, "field acl.secret"),
    ("missing url", with_(url=DROP), 400, "field url"),
    ("url not a string", with_(url=5), 400, "field url"),
    ("missing data", with_(data=DROP), 400, "field data"),
    ("data not a string", with_(data={"a": 1}), 400, "field data"),
    ("partition_key not a string", with_(partition_key=42), 400, "field partition_key"),
    ("ftp url", with_(url="ftp://svc.test/x"), 400, "field url"),
    ("relative url", with_(url="/hook"), 400, "field url"),
    ("url without host", with_(url="http:///hook"), 400, "field url"),
    ("bad JSON", b'{"acl": ', 400, "invalid JSON"),
    ("JSON not an object", b"[1, 2]", 400, "JSON object"),
    (
        "invalid UTF-8",
        b'{"acl":{"name":"system-1","secret":"\xff"},"url":"http://a/","data":""}',
        400,
        "invalid JSON",
    ),
    ("oversize body", with_(data="x" * BODY_LIMIT), 413, "over the limit"),
]


@pytest.fixture
def topic() -> str:
    """A topic per test: "nothing reaches Kafka" must not depend on which test ran first."""
    return unique("ingest")


@pytest.fixture
async def bigpipe(kafka: str, topic: str, tmp_path: Path, processes: list[Bigpipe]) -> Bigpipe:
    config = base_config(kafka, topic, free_port(), **{"http.server.body.limit": BODY_LIMIT})
    node = await Bigpipe(config, tmp_path).start()
    processes.append(node)
    return node


async def test_bad_input_is_refused_and_nothing_reaches_kafka(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, kafka: str, topic: str
) -> None:
    for name, body, status, message in BAD_INPUTS:
        got_status, reply = await bigpipe.post_raw(http, body)
        assert (got_status, reply["errno"]) == (status, -1), name
        assert message in reply["msg"], f"{name}: {reply['msg']}"
        assert reply["data"] is None
    assert topic_record_count(kafka, topic) == 0
    stats = await bigpipe.stats(http)
    assert stats["serverStats"]["receivedCall"] == len(BAD_INPUTS)
    assert stats["serverStats"]["acceptedCall"] == 0


async def test_replies_are_json_with_matching_status(
    bigpipe: Bigpipe, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{bigpipe.url}/rpc/call") as response:
        assert response.status == 405
        assert response.content_type == "application/json"
        assert (await response.json())["errno"] == -1
    async with http.post(f"{bigpipe.url}/rpc/call", data=with_()) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        reply = await response.json()
        assert reply["errno"] == 0 and reply["msg"] == "success"
        assert len(reply["data"]["id"]) == 32
    async with http.get(f"{bigpipe.url}/nowhere") as response:
        assert (response.status, (await response.json())["errno"]) == (404, -1)


async def test_mock_downstream_answers_200_empty(
    bigpipe: Bigpipe, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{bigpipe.url}/rpc/server/mock", data=b"anything") as response:
        assert response.status == 200
        assert await response.read() == b""


async def test_accepted_call_is_in_kafka_before_the_reply(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, kafka: str, topic: str
) -> None:
    before = topic_record_count(kafka, topic)
    status, reply = await bigpipe.post_call(http, data="durable", partition_key="user-42")
    assert (status, reply["errno"]) == (200, 0)
    assert topic_record_count(kafka, topic) == before + 1


async def test_expect_100_continue_gets_the_interim_reply_then_the_call_is_accepted(
    bigpipe: Bigpipe,
) -> None:
    """curl sends `Expect: 100-continue` with bodies over 1 KiB and waits for the 100."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bigpipe.port)
    body = with_(data="x" * 2048)
    head = (
        f"POST /rpc/call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    writer.write(head.encode())
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()


BURST = 600  # connections opened at once: more than a default listen backlog (128) holds


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full
    (TcpExt ListenOverflows): each one is a SYN its client sends again a second later."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names[0] == "TcpExt:":
            return int(values[names.index("ListenOverflows")])
    raise AssertionError("no TcpExt ListenOverflows in /proc/net/netstat")


async def test_a_burst_of_new_connections_is_accepted_without_a_syn_retry(
    bigpipe: Bigpipe,
) -> None:
    """Clients that reconnect at once (after a deploy, a network blip) are all accepted at
    once: a full accept queue drops their SYNs, and each then waits a second or more."""

    async def ask_once() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", bigpipe.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: bigpipe\r\n\r\n")
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        finally:
            writer.close()

    before = listen_overflows()
    heads = await asyncio.gather(*(ask_once() for _ in range(BURST)))
    assert all(head.startswith(b"HTTP/1.1 200") for head in heads)
    assert listen_overflows() == before, "connections were dropped by a full accept queue"
