"""Result callbacks: the downstream's answer, or the dead letter, reaches the caller."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from tests.support import Bigpipe, Downstream, dead_letter_topic, eventually, start_node

ANSWER = orjson.dumps({"order": 42, "note": "créé", "bytes": "\u0000\u00ff"}) + b"\n"


async def by_path(request: web.Request, _number: int) -> web.Response:
    if request.path == "/hook":
        return web.Response(status=201, body=ANSWER, headers={"X-Order": "42"})
    if request.path == "/fail":
        return web.Response(status=500, text="boom")
    return web.Response(status=204)  # the callback receiver


async def test_the_downstreams_answer_reaches_callback_byte_exact(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = by_path
    bigpipe, _ = await start_node(kafka, tmp_path, processes, retries=0)
    _, reply = await bigpipe.post_call(
        http, "order", downstream.url("/hook"), callback=downstream.url("/cb")
    )
    call_id = reply["data"]["id"]
    await eventually(lambda: len(downstream.requests) == 2, 30, "the call and its callback")
    delivered, callback = downstream.requests
    assert delivered.call_id == call_id
    assert callback.headers["Content-Type"] == "application/json"
    assert callback.call_id != call_id, "a callback is a call of its own"
    report = orjson.loads(callback.body)
    assert base64.b64decode(report.pop("body")) == ANSWER
    assert report.pop("headers")["X-Order"] == "42"
    assert report.pop("latency_ms") >= 0
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    assert report == {
        "id": call_id,
        "group": group,
        "status": 201,
        "bodyCut": False,
        "attempts": 1,
    }


async def test_a_dead_lettered_call_reaches_failure_callback(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = by_path
    bigpipe, _ = await start_node(kafka, tmp_path, processes, retries=1)
    _, reply = await bigpipe.post_call(
        http,
        "doomed",
        downstream.url("/fail"),
        callback=downstream.url("/ok-cb"),
        failure_callback=downstream.url("/fail-cb"),
    )
    await eventually(lambda: len(downstream.requests) == 3, 30, "two attempts and a callback")
    callback = downstream.requests[-1]
    assert callback.body and callback.call_id != reply["data"]["id"]
    report = orjson.loads(callback.body)
    assert report["id"] == reply["data"]["id"]
    assert (report["status"], report["attempts"]) == (500, 2)
    assert report["error"] == "HTTP 500: boom"
    assert report["deadLetter"] == {"topic": dead_letter_topic(bigpipe)}


async def test_callback_urls_are_checked_like_url(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], http: aiohttp.ClientSession
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    status, reply = await bigpipe.post_call(http, "d", callback="ftp://example.com/x")
    assert (status, reply["msg"]) == (
        400,
        "field callback: must be an absolute http:// or https:// URL",
    )
    status, reply = await bigpipe.post_call(http, "d", failure_callback=7)
    assert (status, reply["msg"]) == (400, "field failure_callback: must be a string when given")


async def slow_hook(request: web.Request, number: int) -> web.Response:
    if request.path == "/hook":
        await asyncio.sleep(0.2)
        return web.Response(status=201, body=b'{"n": %d}' % number)
    if request.path == "/fail":
        await asyncio.sleep(0.2)
        return web.Response(status=500, text="boom")
    # Callbacks queue behind the calls in the group's topic, then need no other work: at
    # full speed all 40 could land between two looks, and the kill would test nothing.
    await asyncio.sleep(0.2)
    return web.Response(status=204)


async def test_no_callback_is_lost_across_kill_9(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = slow_hook
    first, _ = await start_node(kafka, tmp_path, processes, retries=0, concurrency=4)
    ids = set()
    for n in range(40):
        path = "/hook" if n % 2 else "/fail"
        _, reply = await first.post_call(
            http,
            f"call {n}",
            downstream.url(path),
            callback=downstream.url("/cb"),
            failure_callback=downstream.url("/cb"),
        )
        ids.add(reply["data"]["id"])

    def reported() -> set[str]:
        return {
            orjson.loads(r.body)["id"]
            for r in downstream.requests
            if r.headers.get("Content-Type") == "application/json"  # calls are octet-stream
        }

    await eventually(lambda: len(reported()) >= 4, 60, "some callbacks before the kill")
    await first.kill()
    assert reported() < ids, "the kill came too late to test anything"
    second = await Bigpipe(first.config, tmp_path).start()
    processes.append(second)
    await eventually(lambda: reported() == ids, 120, "a callback for every call")
