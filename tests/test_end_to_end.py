"""curl -> Bigpipe -> Kafka -> Bigpipe -> downstream, on a real broker and real HTTP servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.support import (
    Bigpipe,
    Downstream,
    eventually,
    start_node,
)

CALLS = 1000
BIG = "\u00e9" * (256 * 1024)  # 512 KiB of UTF-8


def payload_of(index: int) -> str:
    if index == 0:
        return BIG
    return ["", "héllo wörld ✓ 🚀 \u0000 \n", f"call-{index}"][index % 3]


async def test_a_thousand_calls_arrive_byte_identical_and_stats_add_up(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes, concurrency=50)

    expected: dict[str, bytes] = {}
    gate = asyncio.Semaphore(50)

    async def send(index: int) -> None:
        data = payload_of(index)
        async with gate:
            status, reply = await bigpipe.post_call(
                http, data=data, url=downstream.url(), partition_key=f"user-{index % 7}"
            )
        assert (status, reply["errno"]) == (200, 0), reply
        expected[reply["data"]["id"]] = data.encode()

    await asyncio.gather(*(send(i) for i in range(CALLS)))
    assert len(expected) == CALLS

    await eventually(
        lambda: set(expected) <= downstream.call_ids(),
        90,
        "every accepted call to reach the downstream",
    )
    for request in downstream.requests:
        assert request.body == expected[request.call_id], f"body of {request.call_id} differs"
        assert request.headers["Content-Type"] == "application/octet-stream"
        assert request.attempt == 1

    async def all_counted() -> bool:
        return (await bigpipe.stats(http))["clientStats"][topic]["rpcTotal"] == CALLS

    await eventually(all_counted, 30, "every delivery to be counted")
    stats = await bigpipe.stats(http)
    assert stats["serverStats"] == {"receivedCall": CALLS, "acceptedCall": CALLS, "overloadCall": 0}
    assert stats["producerStats"][topic] == {"deliverySuccess": CALLS, "deliveryFail": 0}
    group = stats["consumerStats"][0]
    assert (group["handleMessage"], group["invalidMessage"]) == (CALLS, 0)
    assert stats["clientStats"][topic] == {
        "rpcTotal": CALLS,
        "rpcSuccess": CALLS,
        "rpcFail": 0,
        "rpcRetries": 0,
        "circuitIsBreak": 0,
    }
    assert await bigpipe.stop() == 0


async def test_caller_headers_are_forwarded_without_secrets_or_hop_headers(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    async with http.post(
        f"{bigpipe.url}/rpc/call",
        json={
            "acl": {"name": "system-1", "secret": "s3cret-for-tests"},
            "url": downstream.url(),
            "data": "h",
        },
        headers={"X-Trace": "trace-1", "Authorization": "Bearer x", "X-Bigpipe-Attempt": "99"},
    ) as response:
        call_id = (await response.json())["data"]["id"]
    await eventually(lambda: call_id in downstream.call_ids(), 30, "the call to arrive")
    headers = downstream.requests[0].headers
    assert headers["X-Trace"] == "trace-1"
    assert headers["X-Bigpipe-Call-Id"] == call_id
    assert headers["X-Bigpipe-Attempt"] == "1"
    assert "Authorization" not in headers
    assert headers["Host"] == f"127.0.0.1:{downstream.port}"
