"""The supervisor of a multi-worker node: one config for all workers, restarts that
cannot loop forever, as many workers as usable CPUs, and its files in /dev/shm."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bigpipe.config import parse_config
from bigpipe.node import workers as workers_module
from bigpipe.node.board import node_directory
from bigpipe.node.signals import Wakeups
from bigpipe.node.workers import (
    SUPERVISOR_PID_ENV,
    NodeFile,
    Supervisor,
    cgroup_cpu_quota,
    write_snapshot,
)
from bigpipe.stats import NodeCounters
from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    base_config,
    eventually,
    free_port,
    reload,
    rewrite,
    unique,
)
from tests.test_workers import children

CALLS = 24  # on fresh connections: each worker takes some, bar a 2^-23 chance


def two_workers(kafka: str, **overrides: Any) -> dict[str, Any]:
    config = base_config(kafka, unique("sup"), free_port(), **{"http.server.workers": 2})
    config.update(overrides)
    return config


async def statuses(bigpipe: Bigpipe, secret: str) -> list[int]:
    """The HTTP status of CALLS calls with this secret, each on a new connection, so the
    kernel spreads them over the workers."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        found = []
        for _ in range(CALLS):
            body = {"acl": {"name": ACL_NAME, "secret": secret}, "url": "http://h/", "data": ""}
            async with fresh.post(f"{bigpipe.url}/rpc/call", json=body) as response:
                found.append(response.status)
        return found


async def kill_a_worker_and_wait_for_its_successor(bigpipe: Bigpipe) -> int:
    assert bigpipe.process is not None
    supervisor = bigpipe.process.pid
    victim, *others = sorted(children(supervisor))
    survivors = set(others)
    os.kill(victim, signal.SIGKILL)

    def restarted() -> bool:
        workers = children(supervisor)
        return len(workers) == 2 and victim not in workers

    await eventually(restarted, 30, "the supervisor to restart the killed worker")
    successor = (set(children(supervisor)) - survivors).pop()
    await eventually(lambda: listening(successor, bigpipe.port), 30, "the successor to listen")
    await bigpipe.wait_ready()
    return supervisor


def listening(pid: int, port: int) -> bool:
    """Does process `pid` hold a listening TCP socket on `port`?"""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return True
    return False


async def test_a_restarted_worker_runs_the_running_config_not_the_edited_file(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe = await Bigpipe(two_workers(kafka), tmp_path).start()
    processes.append(bigpipe)
    topic = bigpipe.config["kafka.topics"][0]["name"]
    edited = [{"name": ACL_NAME, "secret": "edited-not-reloaded", "topic": topic}]
    rewrite(bigpipe, **{"kafka.producer.acl": edited})
    await kill_a_worker_and_wait_for_its_successor(bigpipe)
    by_worker = await statuses(bigpipe, ACL_SECRET)
    print(f"\nrunning secret after a worker restart: {by_worker}")
    assert by_worker == [200] * CALLS, "every worker runs the config last loaded"
    assert await statuses(bigpipe, "edited-not-reloaded") == [403] * CALLS
    async with aiohttp.ClientSession() as http:
        await reload(bigpipe, http)  # now the edit applies, to every worker
    assert await statuses(bigpipe, "edited-not-reloaded") == [200] * CALLS
    assert await bigpipe.stop() == 0


async def test_a_broken_file_on_disk_neither_loops_a_restarted_worker_nor_logs_twice(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe = await Bigpipe(two_workers(kafka), tmp_path).start()
    processes.append(bigpipe)
    bigpipe.config_path.write_text('{"log.level": 4,')  # a half-written file
    async with aiohttp.ClientSession() as http:
        await reload(bigpipe, http, ok=False)  # counted once, node-wide
        await eventually(
            lambda: "reload rejected" in bigpipe.log_tail(), 10, "the rejection in the log"
        )
        supervisor = await kill_a_worker_and_wait_for_its_successor(bigpipe)
        survivors = set(children(supervisor))
        assert await statuses(bigpipe, ACL_SECRET) == [200] * CALLS
        assert set(children(supervisor)) == survivors, "the new worker stays up"
        assert (await bigpipe.stats(http))["nodeStats"]["reloadFailure"] == 1
    log = bigpipe.log_tail(400)
    assert log.count("reload rejected") == 1, "the supervisor checks the file, once"
    assert log.count("exited with") == 1, "one restart, no loop"
    assert await bigpipe.stop() == 0


async def start_command(
    bigpipe: Bigpipe, command: list[str], cwd: Path, wait_ready: bool = True
) -> None:
    """Start `bigpipe` with another command line or directory than tests.support's."""
    bigpipe.config_path.write_bytes(orjson.dumps(bigpipe.config))
    with bigpipe.log_path.open("ab") as log:
        bigpipe.process = await asyncio.create_subprocess_exec(
            *command, "-config", str(bigpipe.config_path), stdout=log, stderr=log, cwd=cwd
        )
    if wait_ready:
        await bigpipe.wait_ready()


async def test_workers_start_whatever_the_current_directory_holds(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """A `bigpipe/` folder in the directory Bigpipe runs from must not shadow the package."""
    shadow = tmp_path / "bigpipe"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("# an unrelated folder of the same name\n")
    bigpipe = Bigpipe(two_workers(kafka), tmp_path)
    processes.append(bigpipe)
    script = Path(sys.executable).with_name("bigpipe")  # the installed command
    await start_command(bigpipe, [str(script)], cwd=tmp_path)
    assert bigpipe.process is not None
    assert len(children(bigpipe.process.pid)) == 2
    assert "exited with" not in bigpipe.log_tail()
    assert await bigpipe.stop() == 0


async def test_the_supervisor_gives_up_when_workers_die_before_they_are_up(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: every worker fails to listen
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = two_workers(kafka, **{"http.server.port": taken.getsockname()[1]})
        bigpipe = Bigpipe(config, tmp_path)
        processes.append(bigpipe)
        await start_command(bigpipe, [sys.executable, "-m", "bigpipe"], tmp_path, False)
        assert bigpipe.process is not None
        code = await asyncio.wait_for(bigpipe.process.wait(), 60)
    log = bigpipe.log_tail()
    print(f"\nexit {code}; {log.count('exited with')} restarts before giving up")
    assert code == 1
    assert re.search(r"worker \d died 3 times in a row before it was up .*giving up", log)


@contextlib.contextmanager
def on_one_cpu() -> Iterator[None]:
    """Processes started inside run on CPU 0 only, as under `taskset -c 0`."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


async def test_worker_count_follows_the_cpus_the_process_may_use(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    if os.cpu_count() == 1:
        pytest.skip("needs a machine with more than one CPU")
    bigpipe = Bigpipe(two_workers(kafka, **{"http.server.workers": 0}), tmp_path)
    processes.append(bigpipe)
    with on_one_cpu():
        await bigpipe.start(wait_ready=False)
    await bigpipe.wait_ready()
    assert bigpipe.process is not None
    assert children(bigpipe.process.pid) == {}, "one usable CPU: one process, no workers"
    assert await bigpipe.stop() == 0


def test_a_cgroup_cpu_quota_caps_the_worker_count(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    (tmp_path / "a" / "b" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path, "/a/b") == 1.5
    assert cgroup_cpu_quota(tmp_path / "a" / "b", "/") is None


def node_files(pid: int) -> list[Path]:
    return sorted(node_directory().glob(f"bigpipe-*-{pid}-*"))


async def test_files_of_a_killed_supervisor_are_removed_by_the_next_one(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    first = await Bigpipe(two_workers(kafka), tmp_path).start()
    processes.append(first)
    assert first.process is not None
    owner = first.process.pid
    names = [p.name for p in node_files(owner)]
    assert len(names) == 2 and {n.split("-")[1] for n in names} == {"board", "config"}
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in node_files(owner)), "owner only"
    await first.kill()  # SIGKILL: it cannot clean up
    assert len(node_files(owner)) == 2
    second = await Bigpipe(two_workers(kafka), tmp_path).start()
    processes.append(second)
    assert node_files(owner) == [], "the next supervisor removed the dead one's files"
    assert second.process is not None and len(node_files(second.process.pid)) == 2
    assert await second.stop() == 0
    assert node_files(second.process.pid) == []


async def test_a_worker_whose_supervisor_died_while_it_started_exits(
    kafka: str, tmp_path: Path
) -> None:
    """Linux sends the supervisor's death signal only to workers that asked for it before
    the supervisor died: a worker started just before a kill -9 would have run orphaned,
    listening and consuming, for ever. It checks its parent once it has asked."""
    config = base_config(kafka, unique("orphan"), free_port())
    snapshot = tmp_path / "snapshot.json"
    write_snapshot(snapshot, config, NodeCounters())
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-P",
        "-m",
        "bigpipe",
        "-config",
        str(tmp_path / "bigpipe.json"),
        "--worker-of",
        f"{tmp_path / 'board'}:0:1",  # never opened: the worker stops before
        "--snapshot",
        str(snapshot),
        # Its parent is this test, not the supervisor it names: that one is gone.
        env={**os.environ, SUPERVISOR_PID_ENV: "1"},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(worker.communicate(), 30)
    finally:  # a worker that failed to exit would run orphaned, listening, for ever
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert worker.returncode == 1, stderr
    assert b"its supervisor is gone already" in stderr


@contextlib.asynccontextmanager
async def supervisor_in_process(
    tmp_path: Path, command: list[str], workers: int = 1
) -> AsyncIterator[tuple[Supervisor, Wakeups, asyncio.Future[int]]]:
    """A Supervisor in a thread of this test whose workers run `command` instead of
    bigpipe; the test sends it signals through its Wakeups."""
    raw = base_config("127.0.0.1:1", unique("sup"), free_port())
    path = tmp_path / "bigpipe.json"
    path.write_bytes(orjson.dumps(raw))
    supervisor = Supervisor(NodeFile.of(raw, parse_config(raw, source=path)), workers)
    supervisor._command = lambda _worker: command  # type: ignore[method-assign]
    wakeups = Wakeups()
    running = asyncio.ensure_future(asyncio.to_thread(supervisor.run, wakeups))
    try:
        yield supervisor, wakeups, running
    finally:
        if not running.done():
            wakeups.send(signal.SIGTERM)
            await asyncio.wait_for(running, 60)
        wakeups.close()


async def test_a_stop_ends_the_restart_backoff_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers_module, "RESTART_BACKOFF_SECONDS", (30,))
    dies = [sys.executable, "-c", "raise SystemExit(3)"]
    async with supervisor_in_process(tmp_path, dies) as (supervisor, wakeups, running):
        [worker] = supervisor._workers
        await eventually(lambda: worker.start_failures == 1, 30, "the worker's first death")
        wakeups.send(signal.SIGTERM)  # now in its 30 s back-off
        assert await asyncio.wait_for(running, 5) == 0, "stopped within the back-off"


async def test_a_worker_that_cannot_be_spawned_ends_the_supervisor_with_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    no_python = [str(tmp_path / "no-such-python")]
    async with supervisor_in_process(tmp_path, no_python) as (_, _, running):
        assert await asyncio.wait_for(running, 30) == 1, "not a hang: given up, exit 1"
    assert "worker 0 could not be started: [Errno 2]" in caplog.text, "the reason, logged"
    assert "giving up" in capsys.readouterr().err
