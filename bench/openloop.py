"""An open-loop load generator: POST a body at a fixed rate, whatever the replies do.

    python -m bench.openloop --url URL --body-file F --rate R --seconds S --out FILE
        [--tasks 4] [--connections 2048] [--start MONOTONIC] [--offset K --stride N]

Call i is due at start + i / rate. A few pacing tasks share the schedule; at
each due time a pacer writes the call on an idle keep-alive connection (or
opens one more) and moves on, so a slow reply never delays the next send.
Connections idle for IDLE_SECONDS are closed rather than reused, before the
server's keep-alive timeout closes them under a call.
(Closed-loop tools such as wrk send less as the server slows, and so hide its
latency.) Several processes can split one schedule: process K of N sends
calls K, K+N, K+2N, ... from the same --start.

The HTTP/1.1 client is a bare asyncio protocol that writes one prepared
request and reads Content-Length replies: an aiohttp client costs several
times more CPU per call, and on a 2-core machine the generator itself then
becomes the bottleneck. Its connections are opened before the first call is
due.

Per call it records, on the system-wide CLOCK_MONOTONIC (so another process
can compare): due, sent, replied, the HTTP status (-1: connection lost, 0: no
reply in time, -2: every allowed connection was busy, -3: could not connect)
and the call id of a 200 reply. They go to FILE as JSON
columns. Latency is measured from `sent` (when the pacer hands the call over,
so a new connection's set-up counts); `sent - due` (the lag) shows whether the
generator kept up.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import uvloop

LOST, NO_CONNECTION, CONNECT_FAILED = -1, -2, -3  # statuses of calls without a reply
GRACE_SECONDS = 30  # after the last send, how long replies may still take
WARM_CONNECTIONS, WARM_BATCH = 256, 32  # opened before the first call is due, 32 at a time
# A connection idle this long is closed, not reused: Bigpipe closes keep-alive connections
# idle for http.server.read.timeout (5 s by default), and a call written just as the server
# closes its connection is lost. Clients that honour a server's keep-alive timeout do this.
IDLE_SECONDS = 4.0


class Columns:
    """What is recorded per call; `slot` indexes this process's calls."""

    def __init__(self, due: list[float]) -> None:
        count = len(due)
        self.due = due
        self.sent = [0.0] * count
        self.replied = [0.0] * count
        self.status = [0] * count
        self.id = [""] * count
        self.open = 0  # calls sent and not answered

    def answered(self, slot: int, status: int, body: bytes) -> None:
        self.replied[slot] = time.monotonic()
        self.status[slot] = status
        self.open -= 1
        if status == 200:
            self.id[slot] = orjson.loads(body)["data"]["id"]


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one call at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self.slot: int | None = None
        self.idle_since = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, slot: int) -> None:
        assert self._transport is not None
        self.slot = slot
        self._transport.write(self._pool.request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        length = None
        for line in bytes(self._buffer[:head_end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        end = head_end + 4 + (length or 0)
        if len(self._buffer) < end:
            return
        status = int(self._buffer[9:12]) if length is not None else LOST
        body = bytes(self._buffer[head_end + 4 : end])
        del self._buffer[:end]
        slot, self.slot = self.slot, None
        if slot is not None:
            self._pool.columns.answered(slot, status, body)
        if length is None and self._transport is not None:
            self._transport.close()  # a reply this client cannot frame
        else:
            self.idle_since = time.monotonic()
            self._pool.idle.append(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot is not None:
            self._pool.columns.answered(self.slot, LOST, b"")
            self.slot = None
        self._pool.lost(self)


class Pool:
    def __init__(self, url: str, body: bytes, columns: Columns, limit: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.columns = columns
        self.idle: deque[Connection] = deque()
        self.limit = limit
        self.opened = 0
        self.connecting: set[asyncio.Task[None]] = set()

    async def open(self) -> Connection:
        self.opened += 1
        try:
            _transport, connection = await asyncio.get_running_loop().create_connection(
                lambda: Connection(self), self.host, self.port
            )
        except OSError:
            self.opened -= 1
            raise
        return connection

    def lost(self, connection: Connection) -> None:
        self.opened -= 1
        if connection in self.idle:
            self.idle.remove(connection)

    def send(self, slot: int) -> None:
        """Send call `slot` now on an idle connection, or as soon as a new one is open."""
        now = self.columns.sent[slot] = time.monotonic()  # a new connection's set-up counts too
        self.columns.open += 1
        self._retire_stale(now)
        if self.idle:
            self.idle.pop().send(slot)
        elif self.opened < self.limit:
            task = asyncio.create_task(self._send_on_new(slot))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)
        else:  # every connection is busy: the call fails, as it would for a real caller
            self.columns.answered(slot, NO_CONNECTION, b"")

    def _retire_stale(self, now: float) -> None:
        """Close the connections idle for IDLE_SECONDS: the least recently used come first."""
        idle = self.idle
        while idle and now - idle[0].idle_since >= IDLE_SECONDS:
            idle.popleft().close()

    async def _send_on_new(self, slot: int) -> None:
        try:
            connection = await self.open()
        except OSError:
            self.columns.answered(slot, CONNECT_FAILED, b"")
            return
        connection.send(slot)


async def generate(args: argparse.Namespace, body: bytes) -> dict[str, list]:
    start = args.start or time.monotonic() + 0.5
    mine = range(args.offset, int(args.rate * args.seconds), args.stride)
    columns = Columns([start + i / args.rate for i in mine])
    pool = Pool(args.url, body, columns, args.connections)
    # In batches, so the server's accept queue (often 128) does not overflow: a dropped
    # SYN is retried only after a second.
    for _ in range(WARM_CONNECTIONS // WARM_BATCH):
        pool.idle.extend(await asyncio.gather(*(pool.open() for _ in range(WARM_BATCH))))

    async def pacer(first: int) -> None:
        for slot in range(first, len(columns.due), args.tasks):
            delay = columns.due[slot] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pool.send(slot)

    await asyncio.gather(*(pacer(first) for first in range(args.tasks)))
    deadline = time.monotonic() + GRACE_SECONDS
    while (columns.open or pool.connecting) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for connection in list(pool.idle):
        connection.close()
    return {
        "due": columns.due,
        "sent": columns.sent,
        "replied": columns.replied,
        "status": columns.status,
        "id": columns.id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--rate", type=float, required=True, help="calls/s, all processes")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", type=int, default=4, help="pacing tasks")
    parser.add_argument("--connections", type=int, default=2048, help="at most, open at once")
    parser.add_argument("--start", type=float, default=0.0, help="CLOCK_MONOTONIC start")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--stride", type=int, default=1)
    args = parser.parse_args()
    columns = uvloop.run(generate(args, Path(args.body_file).read_bytes()))
    Path(args.out).write_bytes(orjson.dumps(columns))


if __name__ == "__main__":
    main()
