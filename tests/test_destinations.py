"""Where a caller's calls may go, judged the way the downstream and the resolver read the URL:
allow prefixes on the decoded, dot-resolved path; denyPrivate on every literal form."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from bigpipe.ingest.destinations import allowed, literal_refusal, parse_rule, server_path
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    dead_letter_topic,
    eventually,
    free_port,
    group_stats,
    read_topic,
    reload,
    rewrite,
    unique,
)

SECRET = "destinations-secret"
# Forms of 127.0.0.1 that inet_aton, and so getaddrinfo, reads as a literal address.
LOOPBACK_SHORTHANDS = ("127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0x7f.1")
# Paths under /ok/ as written, that a server decoding them reaches outside /ok/.
ESCAPING_PATHS = (
    "/ok/..%2Fadmin",
    "/ok/%2e%2e%2Fadmin",
    "/ok/.%2E/admin",
    "/ok/..%5Cadmin",
    "/ok/..;/admin",
    "/ok/x/..%2F..%2Fadmin",
)


# ---------------------------------------------------------------- units
@pytest.mark.parametrize("host", LOOPBACK_SHORTHANDS)
def test_ipv4_shorthands_are_literal_loopback(host: str) -> None:
    assert literal_refusal(URL(f"http://{host}:8080/")) == (
        f"{host} (127.0.0.1) is not a public address"
    )


def test_names_and_public_shorthands_are_left_to_resolution() -> None:
    assert literal_refusal(URL("http://example.com/")) is None
    assert literal_refusal(URL("http://8.8.8.8/")) is None
    assert literal_refusal(URL("http://0x08080808/")) is None  # 8.8.8.8: public
    assert literal_refusal(URL("http://deadbeef.example/")) is None


@pytest.mark.parametrize("path", ESCAPING_PATHS)
def test_allow_prefix_matches_the_path_a_server_decodes(path: str) -> None:
    rules = (parse_rule("http://api.example.test/ok/"),)
    assert server_path(URL(f"http://x{path}").raw_path) == "/admin"
    assert not allowed(rules, URL(f"http://api.example.test{path}"))


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/ok/a", True),
        ("/ok/a%2Fb", True),  # an escaped slash that stays under the prefix is fine
        ("/ok/a/../b", True),
        ("/ok/..", False),
        ("/ok/%252e%252e%252fadmin", False),  # double-encoded: ambiguous, so refused
        ("/okay", False),
    ],
)
def test_allow_prefix_on_harmless_and_ambiguous_paths(path: str, ok: bool) -> None:
    rules = (parse_rule("http://api.example.test/ok/"),)
    assert allowed(rules, URL(f"http://api.example.test{path}")) is ok


# ---------------------------------------------------------------- against a node
@pytest.fixture
async def node(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], downstream: Downstream
) -> Bigpipe:
    topic = unique("dest")
    config = base_config(
        kafka, topic, free_port(), consumers=[consumer_entry(topic, unique("g"), retries=0)]
    )
    config["kafka.producer.acl"] = [
        {"name": "scoped", "secret": SECRET, "topic": topic, "allow": [downstream.url("/ok/")]},
        {"name": "guarded", "secret": SECRET, "topic": topic, "denyPrivate": True},
    ]
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    return bigpipe


async def call_as(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, name: str, url: str
) -> tuple[int, dict[str, Any]]:
    body = {"acl": {"name": name, "secret": SECRET}, "url": url, "data": "d"}
    return await bigpipe.post_raw(http, orjson.dumps(body))


async def test_deny_private_refuses_ipv4_shorthands_at_ingest(
    node: Bigpipe, http: aiohttp.ClientSession, downstream: Downstream
) -> None:
    """Found by the audit: each of these got errno 0, then was dead-lettered at delivery."""
    answers = {}
    for host in LOOPBACK_SHORTHANDS:
        status, reply = await call_as(node, http, "guarded", f"http://{host}:{downstream.port}/")
        answers[host] = (status, reply["errno"])
    print(f"\nshorthand loopback answers: {answers}")
    assert answers == {host: (403, -1) for host in LOOPBACK_SHORTHANDS}
    _, reply = await call_as(node, http, "guarded", f"http://127.1:{downstream.port}/")
    assert reply["msg"] == "url refused: 127.1 (127.0.0.1) is not a public address (denyPrivate)"


async def test_dot_segments_in_escapes_do_not_pass_an_allow_prefix(
    node: Bigpipe, http: aiohttp.ClientSession, downstream: Downstream
) -> None:
    answers = {}
    for path in ESCAPING_PATHS:
        status, _ = await call_as(node, http, "scoped", downstream.url(path))
        answers[path] = status
    print(f"\nescaping paths under an allow prefix: {answers}")
    assert answers == dict.fromkeys(ESCAPING_PATHS, 403)
    status, _ = await call_as(node, http, "scoped", downstream.url("/ok/a%2Fb"))
    assert status == 200


async def test_a_reload_that_tightens_the_acl_holds_back_calls_already_queued(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Found by the audit: after a reload tightening allow, 38 of 40 queued calls still went.

    Three callers queue 10 calls each behind one stuck delivery (concurrency 1). The reload
    narrows one's allow list, turns denyPrivate on for another and removes the third: no
    queued call may reach the downstream after it, and each is dead-lettered at once,
    saying why.
    """
    gate = asyncio.Event()

    async def stuck_until_released(_request: web.Request, _number: int) -> web.Response:
        await gate.wait()
        return web.Response(status=200)

    downstream = await Downstream(behaviour=stuck_until_released).start()
    topic = unique("tighten")
    group = consumer_entry(topic, unique("g"), concurrency=1, timeout=60_000, retries=3)
    config = base_config(kafka, topic, free_port(), consumers=[group])
    callers = {
        "narrowed": {"allow": [downstream.url("/ok/")]},
        "guarded": {},
        "removed": {},
    }
    config["kafka.producer.acl"] = [
        {"name": name, "secret": SECRET, "topic": topic, **extra} for name, extra in callers.items()
    ]
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    for name in callers:
        for _ in range(10):
            status, _ = await call_as(bigpipe, http, name, downstream.url("/ok/x"))
            assert status == 200
    await eventually(lambda: len(downstream.requests) == 1, 30, "the first delivery to stick")
    first = downstream.requests[0].call_id
    rewrite(
        bigpipe,
        **{
            "kafka.producer.acl": [
                {"name": "narrowed", "secret": SECRET, "topic": topic, "allow": ["x.test"]},
                {"name": "guarded", "secret": SECRET, "topic": topic, "denyPrivate": True},
            ]
        },
    )
    await reload(bigpipe, http)
    gate.set()

    async def all_finished() -> bool:
        return (await group_stats(bigpipe, http))["rpcTotal"] == 30

    await eventually(all_finished, 60, "every call to be delivered or dead-lettered")
    letters = [
        orjson.loads(r.value())
        for r in await asyncio.to_thread(read_topic, kafka, dead_letter_topic(bigpipe), 29)
    ]
    reasons = Counter((letter["call"]["caller"], letter["lastError"]) for letter in letters)
    print(f"\nafter tightening: {len(downstream.requests)} of 30 queued calls delivered")
    for (caller, reason), count in sorted(reasons.items()):
        print(f"  {count} x {caller}: {reason}")
    assert [r.call_id for r in downstream.requests] == [first], "only the call in flight"
    assert len(letters) == 29
    assert all(letter["attempts"] == 0 for letter in letters if letter["call"]["id"] != first)
    refused = "destination refused: "
    expected = {
        "narrowed": f"{refused}url not allowed for caller 'narrowed': not in its allow list",
        "guarded": f"{refused}url refused: 127.0.0.1 is not a public address (denyPrivate)",
        "removed": f"{refused}caller 'removed' is no longer in kafka.producer.acl",
    }
    assert {reason for _, reason in reasons} <= set(expected.values())
    assert {caller: expected[caller] for caller, _ in reasons} == {
        caller: reason for caller, reason in reasons
    }
    await downstream.stop()


async def test_calls_held_by_an_open_breaker_are_refused_at_once_when_their_caller_goes(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """A refusal does not wait for the breaker: calls it holds (here for its 20 s break
    period) are dead-lettered as soon as a reload removes their caller. (Held, not
    parked: delayThreshold is longer than the break. A parked call is judged when it
    comes back.)"""

    async def failing(_request: web.Request, _number: int) -> web.Response:
        return web.Response(status=500)

    downstream = await Downstream(behaviour=failing).start()
    topic = unique("held")
    breaker = {
        "breakPeriod": 20,
        "recoverPeriod": 1,
        "winSize": 20,
        "minStats": 3,
        "healthRate": 0.9,
    }
    group = consumer_entry(
        topic, unique("g"), retries=5, circuitBreaker=breaker, delayThreshold=30_000
    )
    config = base_config(kafka, topic, free_port(), consumers=[group])
    config["kafka.producer.acl"] = [
        {"name": "leaving", "secret": SECRET, "topic": topic},
        {"name": "staying", "secret": SECRET, "topic": topic},
    ]
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    for _ in range(3):
        assert (await call_as(bigpipe, http, "leaving", downstream.url()))[0] == 200

    async def broken() -> bool:
        return (await group_stats(bigpipe, http))["circuitIsBreak"] == 1

    await eventually(broken, 30, "three failures to open the breaker")
    rewrite(bigpipe, **{"kafka.producer.acl": config["kafka.producer.acl"][1:]})
    await reload(bigpipe, http)
    reloaded = time.monotonic()

    async def dead_lettered() -> bool:
        return (await group_stats(bigpipe, http))["deadLetter"] == 3

    await eventually(dead_lettered, 15, "the held calls of the removed caller to be refused")
    print(f"\nheld calls refused {time.monotonic() - reloaded:.1f} s after their caller went")
    await downstream.stop()
