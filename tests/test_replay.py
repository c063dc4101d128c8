"""`bigpipe replay`: a window of calls, found by time in Kafka, is delivered again.

300 calls are delivered: 50 before the window, 200 in it, 50 after. A replay of
the window to another URL must bring exactly the 200 there, with their ids and
marked as a replay, and nothing to the first downstream.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson

from tests.support import Bigpipe, Downstream, eventually, start_node
from tests.test_dlq import group_counters, run_cli

BEFORE, WINDOW, AFTER = 50, 200, 50
# Record times are in milliseconds, taken by the node when it writes: a gap of a few
# milliseconds between the batches and the window's bounds keeps each batch on its side.
CLOCK_GAP_SECONDS = 0.01


async def post_batch(bigpipe: Bigpipe, http: aiohttp.ClientSession, url: str, n: int) -> list[str]:
    replies = await asyncio.gather(
        *(bigpipe.post_call(http, f"call {i}", url, partition_key=f"k{i}") for i in range(n))
    )
    assert {(status, reply["errno"]) for status, reply in replies} == {(200, 0)}
    return [reply["data"]["id"] for _, reply in replies]


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_replay_delivers_exactly_the_window_again_to_the_url_given(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    await post_batch(bigpipe, http, downstream.url(), BEFORE)
    await asyncio.sleep(CLOCK_GAP_SECONDS)
    since = now_ms()
    await asyncio.sleep(CLOCK_GAP_SECONDS)
    window = await post_batch(bigpipe, http, downstream.url(), WINDOW)
    await asyncio.sleep(CLOCK_GAP_SECONDS)
    until = now_ms()
    await asyncio.sleep(CLOCK_GAP_SECONDS)
    await post_batch(bigpipe, http, downstream.url(), AFTER)
    total = BEFORE + WINDOW + AFTER
    await eventually(lambda: len(downstream.answered_ids()) == total, 60, "every call once")
    before = (await group_counters(bigpipe, http))[group]

    elsewhere = await Downstream().start()
    try:
        command = ["replay", "-config", str(bigpipe.config_path), "--group", group]
        window_args = ["--since", str(since), "--until", str(until), "--to-url", elsewhere.url()]
        code, out, err = await run_cli(*command, *window_args, "--dry-run", "--json")
        assert code == 0, err
        assert orjson.loads(out)["selected"] == WINDOW
        assert elsewhere.requests == []

        code, out, err = await run_cli(*command, *window_args, "--json")
        assert code == 0, err
        assert orjson.loads(out)["replayed"] == WINDOW

        await eventually(lambda: len(elsewhere.requests) >= WINDOW, 60, "the window again")

        async def all_read() -> bool:
            counters = (await group_counters(bigpipe, http))[group]
            return counters["rpcTotal"] == before["rpcTotal"] + WINDOW

        await eventually(all_read, 60, "the group to finish the replayed calls")
        assert sorted(r.call_id for r in elsewhere.requests) == sorted(window)
        assert {r.headers.get("X-Bigpipe-Replay") for r in elsewhere.requests} == {"1"}
        assert len(downstream.requests) == total, "nothing went to the calls' own URL"
    finally:
        await elsewhere.stop()


async def test_replay_refuses_a_window_without_a_start_or_a_group(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    config = str(bigpipe.config_path)
    code, _, err = await run_cli("replay", "-config", config, "--group", "nope", "--since", "1h")
    assert code == 2 and "--group nope: no such consumer group" in err
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    code, _, err = await run_cli("replay", "-config", config, "--group", group)
    assert code == 2 and "--since" in err
    code, _, err = await run_cli("replay", "-config", config, "--group", group, "--since", "soon")
    assert code == 2 and "--since: 'soon' is not a time" in err
