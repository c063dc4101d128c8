"""SIGUSR1 from a process's first instruction on: never fatal, never lost.

A reload signal may come at any moment: `killall -USR1 bigpipe` right after a
deploy, `systemctl reload` right after `systemctl start`, or a supervisor
forwarding one to a worker that is still importing its libraries. Its default
action kills the process (exit -10), so Bigpipe blocks it before its heavy
imports and takes it once its handler is in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import (
    ACL_NAME,
    REPO,
    Bigpipe,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    rewrite,
    unique,
)
from tests.test_workers import children

USR1 = 1 << (signal.SIGUSR1 - 1)  # SIGUSR1's bit in /proc/PID/status's signal masks


def importing_libraries(pid: int) -> bool:
    """Has the process begun loading its third-party extension modules (aiohttp, uvloop, ...)?

    By then a Python program is well past the interpreter's start, so Bigpipe must have
    SIGUSR1 blocked; the handler comes only after these imports.
    """
    try:
        return "site-packages" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def signal_mask(pid: int, field: str) -> int:
    """SigBlk, SigIgn or SigCgt of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} for pid {pid}")


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Blocking: poll /readyz until 200, failing if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"bigpipe exited {process.returncode}"
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2),
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s")


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr1_while_starting_kills_nothing_and_the_reload_is_applied(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], workers: int
) -> None:
    topic = unique("early")
    config = base_config(
        kafka,
        topic,
        free_port(),
        consumers=[consumer_entry(topic, unique("g"))],
        **{"http.server.workers": workers},
    )
    bigpipe = Bigpipe(config, tmp_path)
    await bigpipe.start(wait_ready=False)
    processes.append(bigpipe)
    assert bigpipe.process is not None
    supervisor = bigpipe.process.pid
    new_acl = [{"name": ACL_NAME, "secret": "the-edited-secret", "topic": topic}]
    rewrite(bigpipe, **{"kafka.producer.acl": new_acl})
    signalled: set[int] = set()

    async def signal_each_process_while_it_imports() -> None:
        while True:
            for pid in (supervisor, *children(supervisor)):
                if pid not in signalled and importing_libraries(pid):
                    os.kill(pid, signal.SIGUSR1)
                    signalled.add(pid)
            await asyncio.sleep(0.002)

    pester = asyncio.create_task(signal_each_process_while_it_imports())
    try:
        await bigpipe.wait_ready()
    finally:
        pester.cancel()
    assert supervisor in signalled
    assert bigpipe.process.returncode is None
    async with aiohttp.ClientSession() as http:

        async def reload_counted() -> bool:
            return (await bigpipe.stats(http))["nodeStats"]["reloadSuccess"] >= 1

        await eventually(reload_counted, 30, "the signal taken while starting, as a reload")
        status, _ = await bigpipe.post_call(http, url="http://127.0.0.1:1/x")
        assert status == 403, "the old secret is gone: the edited ACL is in force"
    if workers > 1:
        # Each worker was signalled while it imported, and none died of it (nor was
        # restarted: see the log). The child that checks the config with librdkafka,
        # forked for a moment at start and on the reload (bigpipe.node.preflight), may
        # have been signalled too; had it died of it, the node would have exited 2.
        workers_now = set(children(supervisor))
        assert len(workers_now) == workers and workers_now <= signalled
    assert "exited with" not in bigpipe.log_tail(200)
    assert await bigpipe.stop() == 0


def test_ready_notification_comes_once_sigusr1_is_handled(kafka: str, tmp_path: Path) -> None:
    """systemd (Type=notify) holds `systemctl reload` until READY=1: it must mean "safe"."""
    config_path = tmp_path / "bigpipe.json"
    config = base_config(kafka, unique("notify"), free_port(), **{"http.server.workers": 2})
    config_path.write_bytes(orjson.dumps(config))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(60)
    process = subprocess.Popen(
        [sys.executable, "-m", "bigpipe", "-config", str(config_path)],
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message.split("\n")
        assert signal_mask(process.pid, "SigCgt") & USR1, "READY=1 before the handler"
        process.send_signal(signal.SIGUSR1)
        wait_ready(config["http.server.port"], process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        listener.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_systemd_holds_reloads_until_bigpipe_says_ready() -> None:
    unit = (REPO / "deploy" / "systemd" / "bigpipe.service").read_text().splitlines()
    assert "Type=notify" in unit and "NotifyAccess=main" in unit


async def test_a_reload_waits_for_the_start_and_one_during_the_drain_is_ignored(
    kafka: str, tmp_path: Path
) -> None:
    """SIGUSR1 while Node.start() is under way, then while Node.stop() is (a node in a
    process of its own: tests/reload_during_start.py). The first used to start a second
    bring-up (every consumer group twice); the second, a reload racing the drain."""
    topic = unique("calls")
    raw = base_config(kafka, topic, free_port(), consumers=[consumer_entry(topic, unique("g"))])
    path = tmp_path / "bigpipe.json"
    path.write_bytes(orjson.dumps(raw))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.reload_during_start", str(path)],
        capture_output=True,
        cwd=REPO,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    outcome = orjson.loads(done.stdout.splitlines()[-1])
    assert outcome["reloads_after_start"] == 1, "the early reload, once the node started"
    assert outcome["edited_acl_in_force"], "the edited ACL in force"
    assert outcome["groups_started"] == 1, "the group started once, not by two bring-ups"
    assert outcome["exit"] == 0
    assert outcome["reloads_in_all"] == 1, "no reload while draining"
    assert "SIGUSR1 while draining: ignored" in outcome["log"]
