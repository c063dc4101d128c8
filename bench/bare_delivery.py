"""The delivery baseline: a bare aiohttp client in N processes, as Bigpipe runs N workers.

    python -m bench.bare_delivery --url URL --calls C --concurrency K [--processes N]

Each process posts its share of the C requests to URL, with the body and
headers Bigpipe sends, from ceil(K / N) concurrent tasks on uvloop: the split
Bigpipe makes of a group's `concurrency` over its N workers. So with N
workers, Bigpipe is compared with N client processes, not one.

Each process prints one line when done, `cpu SECONDS`: the CPU time it spent
sending (not starting up). The exit status is non-zero if any request got a
status other than 204 or any process failed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time

import aiohttp
import uvloop

from bench.children import die_with_parent
from bench.common import DATA

HEADERS = {
    "Content-Type": "application/octet-stream",
    "X-Bigpipe-Call-Id": "0" * 32,
    "X-Bigpipe-Attempt": "1",
}


async def post_all(url: str, calls: int, concurrency: int) -> None:
    """Post `calls` requests from `concurrency` tasks sharing one keep-alive pool."""
    remaining = calls
    body = DATA.encode()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=HEADERS) as response:
                await response.read()
                if response.status != 204:
                    raise RuntimeError(f"the downstream answered {response.status}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.wait_for(asyncio.gather(*(worker(session) for _ in range(concurrency))), 300)


def one_process(url: str, calls: int, concurrency: int) -> None:
    started = time.process_time()
    uvloop.run(post_all(url, calls, concurrency))
    print(f"cpu {time.process_time() - started:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    share = math.ceil(args.concurrency / args.processes)
    children = []
    parent = os.getpid()
    for index in range(args.processes):
        calls = args.calls // args.processes + (index < args.calls % args.processes)
        pid = os.fork()
        if pid == 0:
            die_with_parent(parent)
            try:
                one_process(args.url, calls, share)
            except Exception as exc:  # reported, and the exit status says it failed
                print(f"bare_delivery: {exc!r}", file=sys.stderr, flush=True)
                os._exit(1)
            os._exit(0)
        children.append(pid)
    failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
