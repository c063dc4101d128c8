"""A downstream's reply is judged by its status line; its body is read, bounded, on the side."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import Bigpipe, Downstream, eventually, group_stats, start_node

CALLS = 10
TIMEOUT_MS = 300


async def slow_body_200(request: web.Request, _number: int) -> web.StreamResponse:
    """200 at once, then a body that takes four times the attempt timeout to arrive.

    Bigpipe may hang up before the body is done: that is its bound on the body read.
    """
    response = web.StreamResponse(status=200)
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):
        for _ in range(6):
            await asyncio.sleep(TIMEOUT_MS * 4 / 6 / 1000)
            await response.write(b"still coming ")
        await response.write_eof()
    return response


async def test_a_2xx_with_a_slow_body_is_a_success(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Found by the audit: 10 calls, 30 deliveries answered 200, 10 false dead letters."""
    downstream = await Downstream(behaviour=slow_body_200).start()
    bigpipe, _ = await start_node(kafka, tmp_path, processes, timeout=TIMEOUT_MS, retries=2)
    for index in range(CALLS):
        status, reply = await bigpipe.post_call(http, data=str(index), url=downstream.url())
        assert (status, reply["errno"]) == (200, 0), reply

    async def all_finished() -> bool:
        return (await group_stats(bigpipe, http))["rpcTotal"] == CALLS

    await eventually(all_finished, 60, "every call to finish")
    stats = await group_stats(bigpipe, http)
    print(
        f"\nslow 2xx body: calls={CALLS} deliveries={len(downstream.requests)} "
        f"success={stats['rpcSuccess']} dead_letters={stats['deadLetter']}"
    )
    assert (stats["rpcSuccess"], stats["deadLetter"], stats["rpcRetries"]) == (CALLS, 0, 0)
    assert len(downstream.requests) == CALLS
    await downstream.stop()


async def test_a_5xx_with_a_slow_body_is_still_retried_as_a_5xx(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    async def slow_body_503(request: web.Request, number: int) -> web.StreamResponse:
        if number > 0:
            return web.Response(status=200)
        response = web.StreamResponse(status=503)
        await response.prepare(request)
        await asyncio.sleep(TIMEOUT_MS * 4 / 1000)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof(b"late")
        return response

    downstream = await Downstream(behaviour=slow_body_503).start()
    bigpipe, _ = await start_node(kafka, tmp_path, processes, timeout=TIMEOUT_MS, retries=2)
    await bigpipe.post_call(http, url=downstream.url())

    async def delivered() -> bool:
        return (await group_stats(bigpipe, http))["rpcSuccess"] == 1

    await eventually(delivered, 30, "the retried call to succeed")
    assert [r.attempt for r in downstream.requests] == [1, 2]
    await downstream.stop()
