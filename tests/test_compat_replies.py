"""http.server.compat.replies: /rpc/call answers byte for byte as the Go original did.

The expected bodies are the original's (server/handler.go, packResponse): Go's
json.Marshal of {errno, msg, data: ""}, keys sorted, always HTTP 200, and the
Content-Type that Go's net/http sniffs when none is set.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import ACL_NAME, ACL_SECRET, Bigpipe, Downstream, eventually, start_node

GO_CONTENT_TYPE = "text/plain; charset=utf-8"
ACL = {"name": ACL_NAME, "secret": ACL_SECRET}


def go_body(errno: int, msg: str) -> bytes:
    return f'{{"data":"","errno":{errno},"msg":"{msg}"}}'.encode()


def call(**fields: object) -> bytes:
    body: dict[str, object] = {"acl": ACL, "url": "http://127.0.0.1:9/x", "data": "d"}
    body["partition_key"] = "k"
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


CASES = [
    ("not JSON", b"{nope", go_body(-1, "JSON无效")),
    ("a JSON array", b"[1]", go_body(-1, "JSON无效")),
    ("url missing", call(url=...), go_body(-1, "url无效")),
    ("url not a string", call(url=5), go_body(-1, "url无效")),
    ("url not http", call(url="ftp://x/y"), go_body(-1, "url无效")),
    ("data missing", call(data=...), go_body(-1, "data无效")),
    ("data not a string", call(data=[1]), go_body(-1, "data无效")),
    ("partition_key missing", call(partition_key=...), go_body(-1, "partition_key无效")),
    ("acl missing", call(acl=...), go_body(-1, "acl无效")),
    ("acl not an object", call(acl="x"), go_body(-1, "acl无效")),
    ("acl.name missing", call(acl={"secret": "s"}), go_body(-1, "acl.name")),
    ("acl.secret missing", call(acl={"name": ACL_NAME}), go_body(-1, "acl.secret")),
    ("unknown caller", call(acl={"name": "nobody", "secret": "s"}), go_body(-1, "权限错误")),
    # Several faults: the original's order decides (url before acl).
    ("url and acl bad", call(url=..., acl=...), go_body(-1, "url无效")),
]


@pytest.fixture
async def node(kafka: str, tmp_path: Path, processes: list[Bigpipe]) -> Bigpipe:
    options = {
        "http.server.compat.replies": True,
        "http.server.read.timeout": 500,
        "http.server.handler.channel.size": 1,
    }
    bigpipe, _ = await start_node(kafka, tmp_path, processes, node=options)
    return bigpipe


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str, bytes]:
    async with http.post(f"{url}/rpc/call", data=body) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


async def test_compat_replies_are_the_originals_byte_for_byte(
    node: Bigpipe, http: aiohttp.ClientSession, downstream: Downstream
) -> None:
    readme_example = orjson.dumps(
        {"acl": ACL, "url": downstream.url(), "data": "hello", "partition_key": "user-42"}
    )
    assert await post(http, node.url, readme_example) == (
        200,
        GO_CONTENT_TYPE,
        go_body(0, "发送成功"),
    )
    await eventually(lambda: len(downstream.requests) == 1, 30, "the accepted call")
    for name, body, expected in CASES:
        got = await post(http, node.url, body)
        assert got == (200, GO_CONTENT_TYPE, expected), name


async def test_compat_overload_and_unreadable_body(
    node: Bigpipe, http: aiohttp.ClientSession, downstream: Downstream
) -> None:
    body = orjson.dumps({"acl": ACL, "url": downstream.url(), "data": "x", "partition_key": "k"})
    overloaded: list[tuple[int, str, bytes]] = []

    async def burst() -> bool:  # channel.size 1: of 40 calls at once, some find it full
        replies = await asyncio.gather(*(post(http, node.url, body) for _ in range(40)))
        overloaded.extend(r for r in replies if r[2] != go_body(0, "发送成功"))
        return bool(overloaded)

    await eventually(burst, 60, "an overloaded reply")
    assert set(overloaded) == {(200, GO_CONTENT_TYPE, go_body(-1, "超过负载"))}

    # A body that never arrives: the original's "internal error", errno 1.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(b"POST /rpc/call HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Type: {GO_CONTENT_TYPE}".encode() in head
    assert payload == go_body(1, "内部错误")
