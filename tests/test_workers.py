"""Several worker processes under one supervisor: one port, node-wide stats, restarts."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from pathlib import Path

import aiohttp

from bigpipe.config import parse_config
from bigpipe.workers import share_of
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    reload,
    unique,
)
from tests.test_config import EXAMPLE

CALLS = 200


def test_limits_are_shared_between_workers() -> None:
    group = parse_config(EXAMPLE).consumers[0]  # rateLimit 100, concurrency 5
    assert share_of(group, 1) is group
    half = share_of(group, 2)
    assert (half.rate_limit, half.concurrency) == (50, 3)
    assert share_of(group, 8).concurrency == 1, "every worker keeps at least one slot"
    assert share_of(group, 3).max_buffered == math.ceil(group.max_buffered / 3)


def process_name(pid: int) -> str:
    """What `killall` matches: /proc/PID/comm."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def children(pid: int) -> dict[int, str]:
    """Child PIDs of `pid` and their process names."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found[int(entry)] = process_name(int(entry))
        except OSError:
            continue
    return found


async def test_two_workers_share_a_port_report_node_wide_and_survive_a_worker_kill(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    topic = unique("workers")
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=4,
        consumers=[consumer_entry(topic, unique("g"))],
        **{"http.server.workers": 2},
    )
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    assert bigpipe.process is not None
    supervisor = bigpipe.process.pid
    assert process_name(supervisor) == "bigpipe"
    await eventually(
        lambda: sorted(children(supervisor).values()) == ["bigpipe-worker"] * 2,
        30,
        "two workers, named bigpipe-worker",
    )

    accepted = set()

    async def send(count: int) -> None:
        for _ in range(count):
            status, reply = await bigpipe.post_call(http, url=downstream.url())
            assert (status, reply["errno"]) == (200, 0)
            accepted.add(reply["data"]["id"])

    await asyncio.gather(*(send(CALLS // 10) for _ in range(10)))
    await eventually(lambda: accepted <= downstream.call_ids(), 60, "every call delivered")

    async def counted(total: int) -> bool:
        stats = await bigpipe.stats(http)
        return (
            stats["serverStats"]["acceptedCall"] == total
            and stats["consumerStats"][0]["rpcSuccess"] >= total
        )

    await eventually(lambda: counted(CALLS), 10, "node-wide counters from both workers")

    victim = next(iter(children(supervisor)))
    os.kill(victim, signal.SIGKILL)
    seen = []

    # A killed worker takes its keep-alive connections with it, so each probe opens a fresh
    # one: the kernel only hands new connections to the listeners still alive.
    fresh_connections = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh_connections) as probe:

        async def restarted() -> bool:
            seen.append((await bigpipe.stats(probe))["serverStats"]["acceptedCall"])
            workers = children(supervisor)
            return len(workers) == 2 and victim not in workers

        await eventually(restarted, 30, "the supervisor to restart the killed worker")
    assert seen == sorted(seen) and min(seen) >= CALLS, "counters never go backwards"
    await bigpipe.wait_ready()
    await send(CALLS)
    await eventually(lambda: accepted <= downstream.call_ids(), 60, "calls after the restart")
    await eventually(lambda: counted(2 * CALLS), 10, "counters carried over the restart")

    await reload(bigpipe, http)  # node-wide: the counter rises by exactly one
    assert await bigpipe.stop() == 0
    assert children(supervisor) == {}


def workers_of(config_path: Path) -> list[int]:
    """Worker processes started for a config file, whoever their parent is now."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config_path).encode() in command and b"--worker-of" in command:
            found.append(int(entry))
    return found


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    topic = unique("orphans")
    config = base_config(
        kafka,
        topic,
        free_port(),
        consumers=[consumer_entry(topic, unique("g"))],
        **{"http.server.workers": 2},
    )
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    await eventually(lambda: len(workers_of(bigpipe.config_path)) == 2, 30, "two workers")
    await bigpipe.kill()  # SIGKILL: no chance to forward anything
    await eventually(
        lambda: workers_of(bigpipe.config_path) == [], 30, "the orphaned workers to drain and exit"
    )
