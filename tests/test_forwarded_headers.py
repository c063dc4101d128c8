"""Forwarded headers, checked where they land: at a real downstream, after a real delivery.

The README lists what a caller's headers lose on the way: hop-by-hop headers, credentials,
the body's own framing, and values that are not UTF-8. The caller's request goes out on
the wire byte for byte (http.client), so the node sees exactly these headers.
"""

from __future__ import annotations

import asyncio
import http.client
from pathlib import Path

import aiohttp
import orjson

from tests.support import ACL_NAME, ACL_SECRET, Bigpipe, Downstream, eventually, start_node

STRIPPED = [
    ("Cookie", "session=abc"),
    ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
    ("TE", "trailers"),
    ("Upgrade", "h2c"),
    ("Expect", "100-continue"),
    ("Content-Type", "application/json"),
    ("Authorization", "Bearer token"),
    ("Keep-Alive", "timeout=5"),
    ("Connection", "keep-alive, X-Hop"),
    ("X-Hop", "named by Connection"),
    ("X-Bigpipe-Attempt", "99"),
    ("X-Carries-Secret", f"key={ACL_SECRET}"),
    ("X-Latin-1", b"caf\xe9"),  # one byte of obs-text: not UTF-8
]
KEPT = [
    ("X-Trace", "trace-1"),
    ("User-Agent", "caller/1.0"),
    ("X-Utf8", "café ✓".encode()),
]


def post_with_headers(port: int, body: bytes, headers: list[tuple[str, str | bytes]]) -> dict:
    """POST /rpc/call with exactly these header lines; http.client skips the 100 Continue."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/rpc/call", skip_host=False, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        reply = orjson.loads(response.read())
        assert (response.status, reply["errno"]) == (200, 0), reply
        return reply
    finally:
        conn.close()


async def test_stripped_headers_never_reach_the_downstream_and_the_rest_do(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    body = orjson.dumps(
        {"acl": {"name": ACL_NAME, "secret": ACL_SECRET}, "url": downstream.url(), "data": "h"}
    )
    reply = await asyncio.to_thread(post_with_headers, bigpipe.port, body, STRIPPED + KEPT)
    call_id = reply["data"]["id"]
    await eventually(lambda: call_id in downstream.call_ids(), 30, "the call to arrive")
    [request] = downstream.requests
    received = {name.lower(): value for name, value in request.headers.items()}
    print(f"\nheaders at the downstream: {sorted(received)}")
    leaked = [
        name
        for name, value in STRIPPED
        if name.lower() in received and (name.lower() not in OWN or received[name.lower()] == value)
    ]
    assert leaked == [], f"stripped headers reached the downstream: {leaked}"
    assert received["x-trace"] == "trace-1"
    assert received["user-agent"] == "caller/1.0"
    assert received["x-utf8"] == "café ✓", "valid UTF-8 beyond ASCII goes on unchanged"
    # The headers Bigpipe sets itself, whatever the caller sent under those names.
    assert received["content-type"] == "application/octet-stream"
    assert received["x-bigpipe-attempt"] == "1"
    assert received["x-bigpipe-call-id"] == call_id
    assert request.body == b"h"


# Names the delivery request carries in any case, with Bigpipe's own values (checked above).
OWN = {"content-type", "x-bigpipe-attempt"}
