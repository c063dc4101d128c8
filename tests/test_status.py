"""A call you can follow: its steps in the results topic, its status from any node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from bigpipe.calls.status import status_of
from tests.support import Bigpipe, Downstream, eventually, read_topic, start_node, unique


async def fail_twice(_request: web.Request, number: int) -> web.Response:
    if number < 2:
        return web.Response(status=503, text="busy", headers={"Retry-After": "0"})
    return web.Response(status=204)


async def test_each_step_of_a_call_is_written_to_the_results_topic(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = fail_twice
    results = unique("results")
    bigpipe, topic = await start_node(
        kafka, tmp_path, processes, node={"status.topic": results}, retries=3
    )
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    _, reply = await bigpipe.post_call(http, "x", downstream.url())
    call_id = reply["data"]["id"]
    await eventually(lambda: len(downstream.requests) == 3, 30, "three attempts")
    # queued, then in_flight and attempt three times
    messages = await asyncio.to_thread(read_topic, kafka, results, 7)
    assert {m.key() for m in messages} == {call_id.encode()}
    records = [orjson.loads(m.value()) for m in messages]
    assert [r["e"] for r in records].count("in_flight") == 3
    status = status_of(call_id, records)
    assert status is not None
    assert status["topic"] == topic
    mine = status["groups"][group]
    assert mine["state"] == "delivered"
    assert [a["status"] for a in mine["attempts"]] == [503, 503, 204]
    assert [a["attempt"] for a in mine["attempts"]] == [1, 2, 3]
    assert mine["attempts"][0]["retry_after"] == 0
    assert mine["outcome"]["result"] == "delivered"
    assert all(r["caller"] == "system-1" for r in records)
