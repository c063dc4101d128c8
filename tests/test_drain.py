"""SIGTERM and SIGINT: readiness drops, calls in flight finish or come back, nothing is lost.

A call counts as delivered only once the downstream has answered it. Each test waits for
its group to own the partitions and for calls to be in flight before it signals, so that
"nothing lost" and "nothing sent twice" cannot hold just because nothing was under way.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import (
    Bigpipe,
    Downstream,
    committed_offsets,
    eventually,
    key_for,
    start_node,
)

STUCK = b"stuck"  # calls with this body hang at the downstream while it is told to


async def slow(_request: web.Request, _number: int) -> web.Response:
    await asyncio.sleep(0.05)
    return web.Response(status=200)


async def assigned(bigpipe: Bigpipe) -> None:
    await eventually(
        lambda: "assigned partitions" in bigpipe.log_tail(200), 30, "the group to own partitions"
    )


async def not_ready(bigpipe: Bigpipe, http: aiohttp.ClientSession) -> bool:
    try:
        async with http.get(f"{bigpipe.url}/readyz") as response:
            return response.status == 503
    except aiohttp.ClientError:
        return True  # the listener has closed


async def test_sigterm_under_load_loses_nothing_and_a_clean_drain_redelivers_nothing(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=slow).start()
    first, _ = await start_node(kafka, tmp_path, processes, concurrency=10)
    await assigned(first)
    accepted: list[str] = []
    refusals: set[tuple[int, int]] = set()
    sending = True

    async def sender() -> None:
        while sending:
            try:
                status, reply = await first.post_call(http, url=downstream.url())
            except aiohttp.ClientError:
                return  # the node has closed its listener: the drain is over
            if reply["errno"] == 0:
                accepted.append(reply["data"]["id"])
            else:
                refusals.add((status, reply["errno"]))

    senders = [asyncio.create_task(sender()) for _ in range(4)]
    await eventually(
        lambda: len(accepted) >= 200 and downstream.answered_ids() and downstream.in_flight > 0,
        30,
        "load to build up, with calls delivered and calls in flight",
    )
    in_flight_at_term = downstream.unanswered_ids()
    first.signal(signal.SIGTERM)
    await eventually(lambda: not_ready(first, http), 5, "readiness to go false")
    assert first.process is not None
    assert await asyncio.wait_for(first.process.wait(), 30) == 0
    sending = False
    await asyncio.gather(*senders)
    assert refusals <= {(503, 1)}, f"during the drain callers get errno 0 or 503/1: {refusals}"
    by_first = downstream.answered_ids()
    assert by_first, "the first node must have delivered calls before the drain"
    assert in_flight_at_term, "SIGTERM must land while calls are in flight"
    assert in_flight_at_term <= by_first, "a clean drain finishes the calls in flight"

    # Calls accepted but not yet read when the drain began wait in Kafka for the next node.
    second = await Bigpipe(first.config, tmp_path).start()
    processes.append(second)
    await eventually(
        lambda: set(accepted) <= downstream.answered_ids(),
        30,
        "every accepted call to be delivered",
    )
    ids = [r.call_id for r in downstream.requests]
    duplicates = len(ids) - len(set(ids))
    print(
        f"\ndrain: accepted={len(accepted)} by_first={len(by_first)} "
        f"in_flight_at_sigterm={len(in_flight_at_term)} by_second={len(ids) - len(by_first)} "
        f"lost=0 duplicates={duplicates} refusals={sorted(refusals)}"
    )
    assert duplicates == 0, "a clean drain commits what it delivered: nothing is sent twice"
    assert await second.stop() == 0
    await downstream.stop()


class Stuck:
    """A downstream behaviour: `stuck` calls hang (until their caller goes) while `hang`."""

    def __init__(self) -> None:
        self.hang = True

    async def __call__(self, request: web.Request, _number: int) -> web.Response:
        if self.hang and await request.read() == STUCK:
            await asyncio.sleep(3600)  # cancelled when the caller closes the connection
        return web.Response(status=200)


async def stuck_behind_finished_calls(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    shutdown_timeout_ms: int,
) -> tuple[Bigpipe, Downstream, Stuck, set[str]]:
    """A node where 3 calls of partition 0 hang while the 27 around them have been answered.

    Their offsets (5, 15, 25) are all that keeps partition 0's commit point behind the
    calls that finished, so a node that commits past unfinished calls loses them. Once a
    later call on partition 1 is committed, the same commit has covered partition 0.
    """
    behaviour = Stuck()
    downstream = await Downstream(behaviour=behaviour).start()
    node, topic = await start_node(
        kafka,
        tmp_path,
        processes,
        partitions=2,
        node={"http.server.shutdown.timeout": shutdown_timeout_ms},
        timeout=60_000,
    )
    await assigned(node)
    stuck = set()
    for index in range(30):
        is_stuck = index % 10 == 5
        status, reply = await node.post_call(
            http,
            data=STUCK.decode() if is_stuck else "fast",
            url=downstream.url(),
            partition_key=key_for(0, 2),
        )
        assert (status, reply["errno"]) == (200, 0)
        if is_stuck:
            stuck.add(reply["data"]["id"])
    await eventually(
        lambda: len(downstream.answered_ids()) == 27 and downstream.unanswered_ids() == stuck,
        30,
        "27 calls answered while the 3 stuck ones hang",
    )
    status, _ = await node.post_call(http, url=downstream.url(), partition_key=key_for(1, 2))
    assert status == 200
    group = node.config["kafka.consumer.list"][0]["groupId"]

    def committed() -> dict[int, int]:
        return committed_offsets(kafka, group, topic)

    await eventually(lambda: committed()[1] == 1, 30, "the call on partition 1 to be committed")
    assert committed()[0] == 5, "the commit point stops at the first call still in flight"
    return node, downstream, behaviour, stuck


async def delivered_again_by_a_new_node(
    node: Bigpipe,
    downstream: Downstream,
    behaviour: Stuck,
    stuck: set[str],
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """The calls cut off by the stop must reach the downstream again, from the next node."""
    stopped_at = time.monotonic()
    behaviour.hang = False
    successor = await Bigpipe(node.config, tmp_path).start()
    processes.append(successor)

    def answered_again() -> set[str]:
        return {r.call_id for r in downstream.requests if r.at > stopped_at and r.answered}

    await eventually(lambda: stuck <= answered_again(), 30, "the cut-off calls delivered again")
    assert await successor.stop() == 0
    await downstream.stop()


async def test_sigint_drains_and_the_shutdown_timeout_cuts_off_calls_that_then_come_back(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    node, downstream, behaviour, stuck = await stuck_behind_finished_calls(
        kafka, http, tmp_path, processes, shutdown_timeout_ms=3000
    )
    signalled = time.monotonic()
    node.signal(signal.SIGINT)
    await eventually(lambda: not_ready(node, http), 5, "readiness to go false")
    status, reply = await node.post_call(http, url=downstream.url())
    assert (status, reply["errno"]) == (503, 1), "a call sent during the drain: retry later"
    assert node.process is not None
    assert await asyncio.wait_for(node.process.wait(), 30) == 0
    took = time.monotonic() - signalled
    print(f"\nshutdown timeout 3 s: the drain took {took:.1f} s")
    # The calls get the timeout less the final commit's 1 s; the whole drain, the timeout.
    assert took > 1.8, "the drain waits for the stuck calls until the shutdown timeout"
    assert took < 3 + 5, "the drain ends at the shutdown timeout (plus a loaded machine's slack)"
    assert "3 calls unfinished at shutdown; they will be delivered again" in node.log_tail()
    await delivered_again_by_a_new_node(node, downstream, behaviour, stuck, tmp_path, processes)


async def test_a_second_signal_exits_1_at_once_and_the_calls_in_flight_come_back(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    node, downstream, behaviour, stuck = await stuck_behind_finished_calls(
        kafka, http, tmp_path, processes, shutdown_timeout_ms=60_000
    )
    node.signal(signal.SIGTERM)
    await eventually(lambda: not_ready(node, http), 5, "readiness to go false")
    signalled = time.monotonic()
    node.signal(signal.SIGINT)
    assert node.process is not None
    assert await asyncio.wait_for(node.process.wait(), 30) == 1
    assert time.monotonic() - signalled < 5, "the second signal does not wait for the drain"
    assert "second SIGINT: exiting without draining" in node.log_tail()
    await delivered_again_by_a_new_node(node, downstream, behaviour, stuck, tmp_path, processes)
