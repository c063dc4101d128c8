"""`bigpipe top` in a real terminal: tmux runs it, capture-pane reads the screen, and
send-keys presses q. The view must show each node, a group's rates, its breaker and
its dead letters, and a node that does not answer."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support import (
    REPO,
    Bigpipe,
    Downstream,
    eventually,
    free_port,
    missing_tool,
    start_node,
    unique,
)

FAILING_CALLS = 3


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """tmux on a private socket of this test's own, killed at the end."""
    if shutil.which("tmux") is None:
        missing_tool("tmux is not installed (apt-get install -y tmux)")
    command = ["tmux", "-L", unique("bigpipe-top")]
    yield command
    subprocess.run([*command, "kill-server"], capture_output=True, timeout=10)


def run_tmux(tmux: list[str], *args: str) -> str:
    done = subprocess.run([*tmux, *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout


def screen(tmux: list[str]) -> str:
    return run_tmux(tmux, "capture-pane", "-p", "-t", "top")


def group_row(text: str, group: str) -> list[str]:
    line = next((line for line in text.splitlines() if group in line), "")
    return [cell.strip() for cell in line.split("│")[1:-1]]


async def fail_on_b(request: web.Request, _number: int) -> web.StreamResponse:
    return web.Response(status=500 if request.path == "/b" else 200)


async def test_top_shows_nodes_groups_and_dead_letters_and_quits_on_q(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    tmux: list[str],
) -> None:
    downstream = await Downstream(fail_on_b).start()
    try:
        bigpipe, topic = await start_node(kafka, tmp_path, processes, retries=0)
        group = f"{topic}/{bigpipe.config['kafka.consumer.list'][0]['groupId']}"
        for n in range(FAILING_CALLS):
            status, _ = await bigpipe.post_call(http, f"bad {n}", downstream.url("/b"))
            assert status == 200
        silent = f"127.0.0.1:{free_port()}"
        # COLUMNS and LINES from this process would override the pane's own size.
        top = f"{sys.executable} -m bigpipe top {bigpipe.url} {silent} --interval 0.5"
        # Its exit status through a file: tmux's pane_dead_status was sometimes empty.
        exit_file = tmp_path / "top.exit"
        command = f"env -u COLUMNS -u LINES sh -c '{top}; echo $? > {exit_file}'"
        # A wide window of a fixed size: with no client attached, tmux would use 80x24.
        for args in (
            ("new-session", "-d", "-s", "top", "-x", "200", "-y", "50", "-c", str(REPO), command),
            ("set-option", "-t", "top", "remain-on-exit", "on"),
            ("set-option", "-t", "top", "window-size", "manual"),
            ("resize-window", "-t", "top", "-x", "200", "-y", "50"),
        ):
            await asyncio.to_thread(run_tmux, tmux, *args)

        async def keep_calling() -> None:
            while True:
                await bigpipe.post_call(http, "ok", downstream.url("/a"))
                await asyncio.sleep(0.01)

        caller = asyncio.create_task(keep_calling())
        try:

            def shows_all() -> bool:
                text = screen(tmux)
                row = group_row(text, group)
                destination = group_row(text, f"http://127.0.0.1:{downstream.port}")
                return (
                    "ready" in text
                    and f"{silent}" in text
                    and "unreachable" in text
                    and len(row) == 9
                    and row[1] not in ("-", "0.0")  # deliv/s
                    and row[6] == "NORMAL"
                    and row[7] == str(FAILING_CALLS)  # DLQ
                    and len(destination) == 7  # per-destination figures, from /metrics
                    and destination[2] == "NORMAL"
                    and destination[5] not in ("-", "0.0")  # attempts/s
                )

            await eventually(shows_all, 60, "top to show the node and its group")
        finally:
            caller.cancel()
            print(f"\nthe screen:\n{screen(tmux)}")
        await asyncio.to_thread(run_tmux, tmux, "send-keys", "-t", "top", "q")

        await eventually(exit_file.exists, 30, "top to exit on q")
        assert exit_file.read_text().strip() == "0", "top exits 0 on q"
    finally:
        await downstream.stop()
