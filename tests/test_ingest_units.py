"""Units of Ingest: the node around it is a stand-in whose index and producer answer at
once or wait on events, so the test decides when each lookup and write ends.

What ingest counts as waiting: the bound on calls waiting (channel.size, a 503) and the
drain (wait_idle) cover a keyed call from its index lookup on, not only its write.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any
from unittest import mock

import orjson
import pytest
from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request

from bigpipe.config import parse_config
from bigpipe.ingest.acl import Acl
from bigpipe.ingest.compat import GO_BAD_JSON, GO_BAD_PARTITION_KEY
from bigpipe.ingest.server import Ingest
from bigpipe.metrics import Latencies
from bigpipe.stats import Stats
from tests.support import eventually
from tests.test_config import EXAMPLE


class SlowIndex:
    """Every lookup waits for `go`, then finds no earlier call."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.looking = 0

    async def first_at_ingest(self, _caller: str, _key: str, _timeout: float) -> None:
        self.looking += 1
        await self.go.wait()

    async def record(self, *_args: Any) -> None:
        return None


class InstantProducer:
    """Kafka acknowledges every write at once, at partition 0, offset 0."""

    async def send(self, *_args: Any, **_kwargs: Any) -> tuple[int, int]:
        return 0, 0

    def write(self, *_args: Any, **_kwargs: Any) -> asyncio.Future[tuple[int, int]]:
        placed: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        placed.set_result((0, 0))
        return placed


ACL = {"name": "system-1", "secret": "you are good"}


def call_fields(key: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"url": "http://127.0.0.1:9/h", "data": "d"}
    if key is not None:
        fields["idempotency_key"] = key
    return fields


def call_request(
    key: str | None, headers: dict[str, str] | None = None, body: bytes | None = None
) -> web.Request:
    body = orjson.dumps({"acl": ACL, **call_fields(key)}) if body is None else body
    return posted("/rpc/call", body, headers)


def posted(path: str, body: bytes, headers: dict[str, str] | None = None) -> web.Request:
    payload = streams.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=mock.Mock())
    payload.feed_data(body)
    payload.feed_eof()
    return make_mocked_request("POST", path, headers=headers, payload=payload)


def ingest_node(index: SlowIndex, **settings: Any) -> SimpleNamespace:
    config = parse_config({**EXAMPLE, "http.server.handler.channel.size": 1, **settings})
    node = SimpleNamespace(
        config=config,
        stats=Stats(),
        latencies=Latencies(),
        acl=Acl(config.acl),
        producer=InstantProducer(),
        index=index,
        status_log=None,
        ready=True,
    )
    node.ingest = Ingest(node)  # type: ignore[arg-type]
    return node


async def test_a_keyed_call_looking_up_its_key_counts_as_waiting() -> None:
    index = SlowIndex()
    node = ingest_node(index)
    keyed = asyncio.ensure_future(node.ingest.rpc_call(call_request("k1")))
    await eventually(lambda: index.looking == 1, 5, "the keyed call to look its key up")
    refused = await node.ingest.rpc_call(call_request(None))
    assert refused.status == 503, "channel.size 1 is taken by the keyed call"
    assert orjson.loads(refused.body)["msg"].startswith("overloaded")
    drained = asyncio.ensure_future(node.ingest.wait_idle())
    await asyncio.sleep(0.05)
    assert not drained.done(), "a drain must wait for the keyed call"
    index.go.set()
    assert (await keyed).status == 200
    await asyncio.wait_for(drained, 1)


async def test_a_batch_holds_its_calls_places_until_it_is_answered() -> None:
    """/rpc/calls: each call admitted takes a place of channel.size, the batch gives them
    back once answered, and a drain waits for it; calls past the room left are refused."""
    index = SlowIndex()
    node = ingest_node(index, **{"http.server.handler.channel.size": 2})
    calls = [call_fields("k1"), call_fields(None), call_fields(None)]
    body = orjson.dumps({"acl": ACL, "calls": calls})
    answering = asyncio.ensure_future(node.ingest.rpc_calls(posted("/rpc/calls", body)))
    await eventually(lambda: index.looking == 1, 5, "the keyed call to look its key up")
    refused = await node.ingest.rpc_call(call_request(None))
    assert refused.status == 503, "both places are the batch's until it is answered"
    drained = asyncio.ensure_future(node.ingest.wait_idle())
    await asyncio.sleep(0.05)
    assert not drained.done(), "a drain must wait for the batch"
    index.go.set()
    reply = orjson.loads((await answering).body)
    assert [one["status"] for one in reply["data"]] == [200, 200, 503]
    await asyncio.wait_for(drained, 1)
    assert (await node.ingest.rpc_call(call_request(None))).status == 200


async def test_a_bad_idempotency_key_header_is_a_400_even_when_the_node_cannot_take_calls() -> None:
    """Bad input is a 400, "retrying cannot help", whatever the node's state: a 503
    "retry later" would have the caller retry a request that can never pass."""
    node = ingest_node(SlowIndex())
    node.ready, node.not_ready_reason = False, lambda: "not ready: joining Kafka"
    bad = call_request(None, {"Idempotency-Key": "k" * 300})
    refused = await node.ingest.rpc_call(bad)
    reply = orjson.loads(refused.body)
    assert (refused.status, reply["errno"]) == (400, -1)
    assert reply["msg"].startswith("header Idempotency-Key: must be a string of 1 to 255")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{", GO_BAD_JSON),
        (b"[]", GO_BAD_JSON),
        (b'{"url": "http://svc/h", "data": "d", "acl": {}}', GO_BAD_PARTITION_KEY),
    ],
)
async def test_compat_replies_name_the_originals_first_problem(body: bytes, problem: str) -> None:
    """The body is decoded once, for the original's checks and ours alike."""
    node = ingest_node(SlowIndex(), **{"http.server.compat.replies": True})
    refused = await node.ingest.rpc_call(call_request(None, body=body))
    reply = orjson.loads(refused.body)
    assert (refused.status, reply["errno"]) == (200, -1)
    assert reply["msg"] == problem
