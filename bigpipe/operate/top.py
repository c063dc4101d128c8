"""`bigpipe top`: a live terminal view of one node or several.

Every interval it reads each node's `/stats` and `/metrics`, and shows:
- per node: ready or not, calls received and accepted per second, overloads;
- per consumer group, summed over the nodes: delivered, failed and retried per
  second, requests in flight, lag, the breaker, dead letters, paused partitions;
- per destination, when the nodes report per-destination figures in /metrics
  (`bigpipe_destination_*`): breaker, in flight, held calls.
Rates are the counters' change between two reads. `q` (or Ctrl-C) quits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bigpipe.operate.commands import EXIT_OK
from bigpipe.operate.selection import SelectionError

BREAKER_NAMES = {0: "NORMAL", 1: "BREAK", 2: "RECOVER"}
FETCH_SECONDS = 2.0
RATE_SECONDS = 2.0
GROUP_RATES = (("rpcSuccess", "deliv/s"), ("rpcFail", "fail/s"), ("rpcRetries", "retry/s"))


@dataclass
class Reading:
    """One node's /stats data and /metrics samples at one moment, or why there are none."""

    node: str
    at: float
    stats: dict[str, Any] | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    ready: bool = False
    error: str = ""


def node_url(node: str) -> str:
    node = node.rstrip("/")
    return node if node.startswith(("http://", "https://")) else f"http://{node}"


async def read_node(session: aiohttp.ClientSession, node: str) -> Reading:
    reading = Reading(node, time.monotonic())
    base = node_url(node)
    try:
        async with asyncio.timeout(FETCH_SECONDS):
            async with session.get(f"{base}/stats") as response:
                reading.stats = (await response.json(content_type=None))["data"]
            async with session.get(f"{base}/metrics") as response:
                reading.samples = list(_samples(await response.text()))
            async with session.get(f"{base}/readyz") as response:
                reading.ready = response.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError) as exc:
        reading.stats, reading.error = None, f"unreachable ({_short(exc)})"
    return reading


def _short(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return "connection refused" if refused else "cannot connect"
    return type(exc).__name__


def _samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


# ---------------------------------------------------------------- view
def _rate(now: float | None, before: float | None, seconds: float) -> str:
    if now is None or before is None or seconds <= 0:
        return "-"
    return f"{max(0.0, now - before) / seconds:,.1f}"


def nodes_table(readings: list[Reading], previous: dict[str, Reading]) -> Table:
    table = Table(title="nodes", title_justify="left", expand=True)
    table.add_column("node", no_wrap=True)
    table.add_column("state")
    for column in ("recv/s", "acc/s", "overload", "reloads ok/fail"):
        table.add_column(column, justify="right")
    for reading in readings:
        if reading.stats is None:
            table.add_row(reading.node, Text(reading.error, style="bold red"), "-", "-", "-", "-")
            continue
        server, node = reading.stats["serverStats"], reading.stats.get("nodeStats", {})
        old = previous.get(reading.node)
        old_server = old.stats["serverStats"] if old and old.stats else {}
        seconds = reading.at - old.at if old else 0.0
        table.add_row(
            reading.node,
            Text("ready", style="green") if reading.ready else Text("not ready", style="yellow"),
            _rate(server["receivedCall"], old_server.get("receivedCall"), seconds),
            _rate(server["acceptedCall"], old_server.get("acceptedCall"), seconds),
            str(server["overloadCall"]),
            f"{node.get('reloadSuccess', 0)}/{node.get('reloadFailure', 0)}",
        )
    return table


def _groups(readings: list[Reading]) -> dict[str, dict[str, Any]]:
    """Each group's counters summed over the nodes; breaker: the worst node's."""
    groups: dict[str, dict[str, Any]] = {}
    for reading in readings:
        for entry in (reading.stats or {}).get("consumerStats", []):
            name = f"{entry['topic']}/{entry['groupId']}"
            total = groups.setdefault(
                name, {"lag": 0, "paused": 0, "breakerState": 0, "inFlight": 0, "deadLetter": 0}
            )
            for key, _ in GROUP_RATES:
                total[key] = total.get(key, 0) + entry.get(key, 0)
            total["inFlight"] += entry.get("inFlight", 0)
            total["deadLetter"] += entry.get("deadLetter", 0)
            total["lag"] += sum(entry.get("lag", {}).values())
            states = entry.get("partitions", {}).values()
            total["paused"] += sum(1 for state in states if state.startswith("paused"))
            total["breakerState"] = max(total["breakerState"], entry.get("breakerState", 0))
    return groups


def groups_table(readings: list[Reading], previous: list[Reading], seconds: float) -> Table:
    now, before = _groups(readings), _groups(previous)
    table = Table(title="consumer groups (all nodes)", title_justify="left", expand=True)
    table.add_column("topic/group", no_wrap=True)
    for _, title in GROUP_RATES:
        table.add_column(title, justify="right")
    for title in ("in flight", "lag", "breaker", "DLQ", "paused"):
        table.add_column(title, justify="right")
    for name, total in now.items():
        old = before.get(name, {})
        breaker = BREAKER_NAMES.get(total["breakerState"], "?")
        table.add_row(
            name,
            *(_rate(total.get(key), old.get(key), seconds) for key, _ in GROUP_RATES),
            str(total["inFlight"]),
            str(total["lag"]),
            Text(breaker, style="green" if breaker == "NORMAL" else "bold red"),
            str(total["deadLetter"]),
            str(total["paused"]),
        )
    return table


# The per-destination series of /metrics that the view shows, and how nodes add up.
DESTINATION_SERIES = {
    "bigpipe_destination_breaker_state": "breaker",
    "bigpipe_destination_in_flight": "inFlight",
    "bigpipe_destination_held": "held",
    "bigpipe_destination_attempt_seconds_count": "attempts",
    "bigpipe_destination_attempt_seconds_sum": "seconds",
}


def _destinations(readings: list[Reading]) -> dict[tuple[str, str], dict[str, float]]:
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for reading in readings:
        for name, labels, value in reading.samples:
            figure = DESTINATION_SERIES.get(name)
            if figure is None or "destination" not in labels:
                continue
            key = (f"{labels.get('topic', '')}/{labels.get('group', '')}", labels["destination"])
            row = rows.setdefault(key, {})
            old = row.get(figure, 0.0)
            row[figure] = max(old, value) if figure == "breaker" else old + value
    return rows


def destinations_table(
    readings: list[Reading], previous: list[Reading], seconds: float
) -> Table | Text:
    now, before = _destinations(readings), _destinations(previous)
    if not now:
        return Text("destinations: the nodes report no per-destination figures", style="dim")
    table = Table(title="destinations", title_justify="left", expand=True)
    table.add_column("topic/group", no_wrap=True)
    table.add_column("destination", no_wrap=True)
    for column in ("breaker", "in flight", "held", "attempts/s", "attempt ms (mean)"):
        table.add_column(column, justify="right")
    for (group, destination), row in sorted(now.items()):
        old = before.get((group, destination), {})
        attempts = row.get("attempts", 0.0) - old.get("attempts", 0.0)
        spent = row.get("seconds", 0.0) - old.get("seconds", 0.0)
        breaker = BREAKER_NAMES.get(int(row.get("breaker", 0)), "?")
        table.add_row(
            group,
            destination,
            Text(breaker, style="green" if breaker == "NORMAL" else "bold red"),
            f"{row.get('inFlight', 0):g}",
            f"{row.get('held', 0):g}",
            _rate(row.get("attempts"), old.get("attempts"), seconds),
            f"{1000 * spent / attempts:,.1f}" if old and attempts > 0 else "-",
        )
    return table


def render(readings: list[Reading], previous: list[Reading], interval: float) -> Group:
    by_node = {r.node: r for r in previous}
    seconds = readings[0].at - previous[0].at if previous else 0.0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header = Text(f"bigpipe top  {stamp}  every {interval:g} s  (q quits)", style="bold")
    return Group(
        header,
        nodes_table(readings, by_node),
        groups_table(readings, previous, seconds),
        destinations_table(readings, previous, seconds),
    )


# ---------------------------------------------------------------- loop
async def read_all(session: aiohttp.ClientSession, nodes: list[str]) -> list[Reading]:
    return list(await asyncio.gather(*(read_node(session, n) for n in nodes)))


async def watch(nodes: list[str], interval: float, once: bool, console: Console) -> None:
    async with aiohttp.ClientSession() as session:
        history = deque([await read_all(session, nodes)])
        if once:  # two readings a moment apart, so the rates mean something
            await asyncio.sleep(min(interval, 1.0))
            console.print(render(await read_all(session, nodes), history[0], interval))
            return
        live = Live(render(history[0], [], interval), console=console, screen=True)
        with quit_key() as quit_pressed, live:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(quit_pressed), interval)
                if quit_pressed.done():
                    return
                readings = await read_all(session, nodes)
                # Rates over RATE_SECONDS at least: a node refreshes some figures (its
                # workers' board, per-destination numbers) only a few times a second.
                while len(history) > 1 and readings[0].at - history[1][0].at >= RATE_SECONDS:
                    history.popleft()
                live.update(render(readings, history[0], interval))
                history.append(readings)


@contextlib.contextmanager
def quit_key() -> Iterator[asyncio.Future[None]]:
    """A future done when `q` is pressed; the terminal is in cbreak mode meanwhile, and
    restored however the view ends."""
    loop = asyncio.get_running_loop()
    pressed: asyncio.Future[None] = loop.create_future()
    if not sys.stdin.isatty():
        yield pressed
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def on_key() -> None:
        # os.read, not sys.stdin.read(1): that one buffers whatever else is waiting (the
        # terminal's own replies, other keys), and a `q` behind them would sit in Python's
        # buffer with the descriptor no longer readable, so add_reader never calls again.
        if set(os.read(fd, 1024)) & set(b"qQ") and not pressed.done():
            pressed.set_result(None)

    loop.add_reader(fd, on_key)
    try:
        yield pressed
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# ---------------------------------------------------------------- command line
def add_parser(commands: Any) -> None:
    parser = commands.add_parser("top", help="a live view of one node or several")
    parser.add_argument(
        "nodes",
        nargs="*",
        default=["127.0.0.1:10086"],
        metavar="NODE",
        help="host:port or URL of each node (default: %(default)s)",
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between reads")
    parser.add_argument("--once", action="store_true", help="print one view and exit")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise SelectionError("--interval: must be > 0")
    console = Console(highlight=False)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C quits, as q does
        asyncio.run(watch(args.nodes, args.interval, args.once, console))
    return EXIT_OK
