"""Several worker processes under one supervisor: one port, node-wide stats, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from bigpipe.config import parse_config
from bigpipe.node.board import Board
from bigpipe.node.workers import share_of
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    committed_offsets,
    consumer_entry,
    eventually,
    free_port,
    group_settled,
    group_stats,
    is_view_builder,
    process_name,
    reload,
    unique,
)
from tests.test_config import EXAMPLE

CALLS = 200
PR_SET_CHILD_SUBREAPER = 36


def test_max_buffered_is_split_between_workers() -> None:
    """rateLimit and concurrency are the group's (bigpipe.delivery.budget); maxBuffered a node's."""
    group = parse_config(EXAMPLE).consumers[0]  # rateLimit 100, concurrency 5
    assert share_of(group, 1) is group
    third = share_of(group, 3)
    assert third.max_buffered == math.ceil(group.max_buffered / 3)
    assert (third.rate_limit, third.concurrency) == (group.rate_limit, group.concurrency)


def children(pid: int, view_builders: bool = False) -> dict[int, str]:
    """Child PIDs of `pid` and their process names: its workers, or (`view_builders`) the
    status view's builder it runs (bigpipe.calls.view_builder)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            if is_view_builder(int(entry)) == view_builders:
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

    # Node-wide, reloadSuccess rises by one whether one worker reloaded or all of them: each
    # worker's own count, from the slot it publishes, must rise by one.
    before = reloads_by_worker(supervisor)
    assert sorted(before) == [0, 1]
    await reload(bigpipe, http)
    await eventually(
        lambda: reloads_by_worker(supervisor) == {i: n + 1 for i, n in before.items()},
        10,
        "every worker to reload once",
    )
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


def reloads_by_worker(supervisor: int) -> dict[int, int]:
    """Each worker's own reloadSuccess, from the board slot it publishes its counters to."""
    counts = {}
    for pid in children(supervisor):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        where = command[command.index(b"--worker-of") + 1].decode()
        path, index, slots = where.rsplit(":", 2)
        board = Board(Path(path), int(slots))
        try:
            payload = board.read(int(index))
        finally:
            board.close()
        assert payload is not None, f"worker {index} has not published its counters"
        counts[int(index)] = orjson.loads(payload)["stats"]["node"]["reloadSuccess"]
    return counts


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Become the child subreaper: orphaned descendants become our children, to wait for."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0)


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


async def slowly(_request: web.Request, _number: int) -> web.Response:
    await asyncio.sleep(0.5)  # 60 calls at 8 at once: about 4 s of delivery to cut into
    return web.Response(status=200)


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=slowly).start()
    topic, group = unique("orphans"), unique("g")
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=4,
        consumers=[consumer_entry(topic, group, concurrency=8)],
        **{"http.server.workers": 2, "http.server.shutdown.timeout": 20_000},
    )
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    # Settled first: a partition that moved between the workers would be read again,
    # and handleMessage below would count some calls twice and others not yet at all.
    await group_settled(kafka, group, members=2, partitions=4)
    replies = await asyncio.gather(
        *(bigpipe.post_call(http, url=downstream.url()) for _ in range(60))
    )
    assert {(status, reply["errno"]) for status, reply in replies} == {(200, 0)}
    accepted = {reply["data"]["id"] for _, reply in replies}

    async def consumed_and_in_flight() -> bool:
        stats = await group_stats(bigpipe, http)
        return stats["handleMessage"] == len(accepted) and downstream.in_flight > 0

    await eventually(consumed_and_in_flight, 30, "every call read, some in flight")
    assert len(downstream.answered_ids()) < len(accepted)
    with adopting_orphans():
        workers = workers_of(bigpipe.config_path)
        assert len(workers) == 2
        await bigpipe.kill()  # SIGKILL: no chance to forward anything
        try:
            codes = await asyncio.wait_for(
                asyncio.gather(*(asyncio.to_thread(exit_code, pid) for pid in workers)), 60
            )
        except BaseException:
            # Orphans that did not exit would run on after the test. Not reaped yet (the
            # waiting threads still wait), so these PIDs are still theirs.
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise
    print(f"\norphaned workers: exit codes {codes}")
    assert codes == [0, 0], "the kernel's SIGTERM makes each orphan drain and exit 0"
    assert downstream.answered_ids() == accepted, "the drain delivers every call it had read"
    committed = committed_offsets(kafka, group, topic)
    # A partition no call went to has nothing committed (a negative offset): it adds 0.
    done = sum(max(offset, 0) for offset in committed.values())
    assert done == len(accepted), f"the drain commits them all: {committed}"
    await downstream.stop()


@pytest.mark.parametrize(("in_config", "on_command_line"), [(1, 2), (2, 1)])
async def test_the_workers_option_overrides_the_config(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], in_config: int, on_command_line: int
) -> None:
    topic = unique("cli")
    config = base_config(
        kafka,
        topic,
        free_port(),
        consumers=[consumer_entry(topic, unique("g"))],
        **{"http.server.workers": in_config},
    )
    bigpipe = Bigpipe(config, tmp_path, ("--workers", str(on_command_line)))
    processes.append(await bigpipe.start())
    assert bigpipe.process is not None
    # One worker runs as a single process; more run under a supervisor.
    expected = ["bigpipe-worker"] * on_command_line if on_command_line > 1 else []
    await eventually(
        lambda: sorted(children(bigpipe.process.pid).values()) == expected,
        30,
        f"{on_command_line} worker process(es)",
    )
    assert await bigpipe.stop() == 0


def test_a_negative_workers_option_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bigpipe", "-config", str(tmp_path / "x.json"), "--workers", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--workers must be 0 (one per core) or more" in done.stderr
