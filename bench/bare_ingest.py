"""The ingest baseline: a bare aiohttp `/rpc/call` with no Kafka behind it.

    python -m bench.bare_ingest --port P [--workers N]

It does what any JSON-over-HTTP handler must: read the body, parse it with
orjson, pick out the fields, and answer with a reply of the same shape and
size as Bigpipe's (`{"data": {"id": <32 hex digits>, "partition": P, "offset": O},
"errno": 0, "msg": "success"}`). It is served the way Bigpipe serves: aiohttp's low-level
`web.Server` with a dict from path and method to handler, no router, no
middleware (bigpipe/ingest/server.py, `Routes`). It runs on uvloop with Bigpipe's
garbage-collector setting, in N worker processes that share the port with
SO_REUSEPORT, as Bigpipe's workers do. So bigpipe/bare is the share of plain
aiohttp speed that Bigpipe keeps while it checks the call and waits for
Kafka's acknowledgement: the serving pattern is the same on both sides.

Each worker prints one line, `listening PID`, once it accepts connections.
SIGTERM stops every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import signal
import socket
import sys

import orjson
import uvloop
from aiohttp import web

from bench.children import die_with_parent

# Bigpipe's listen backlog (bigpipe/ingest/listener.py), not imported: that module brings
# Bigpipe's config and pydantic, which would swell the baseline's memory.
LISTEN_BACKLOG = 4096


def make_server() -> web.Server:
    ids = itertools.count()

    async def rpc_call(request: web.BaseRequest) -> web.Response:
        payload = orjson.loads(await request.read())
        acl = payload["acl"]
        if not (
            isinstance(acl["name"], str)
            and isinstance(acl["secret"], str)
            and isinstance(payload["url"], str)
            and isinstance(payload["data"], str)
        ):
            return web.Response(status=400)
        number = next(ids)
        data = {"id": f"{number:032x}", "partition": 0, "offset": number}
        body = orjson.dumps({"data": data, "errno": 0, "msg": "success"})
        return web.Response(body=body, content_type="application/json")

    routes = {"/rpc/call": {"POST": rpc_call}}

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        handler = routes.get(request.path, {}).get(request.method)
        if handler is None:
            return web.Response(status=404)
        return await handler(request)

    return web.Server(dispatch, access_log=None)


async def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    runner = web.ServerRunner(make_server(), handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()  # as Bigpipe listens
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening {os.getpid()}", flush=True)
    await stop.wait()
    await runner.cleanup()


def worker(port: int) -> None:
    gc.freeze()  # the same setting as bigpipe/cli.py's tune_gc
    gc.set_threshold(100_000, 50, 100)
    uvloop.run(serve(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.workers <= 1:
        worker(args.port)
        return
    children = []
    parent = os.getpid()
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            die_with_parent(parent)
            worker(args.port)
            os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)
    sys.exit(0)


if __name__ == "__main__":
    main()
