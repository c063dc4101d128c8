"""Who may call what: allowlists, SSRF refusals, secrets kept secret, limits, TLS."""

from __future__ import annotations

import asyncio
import copy
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from bigpipe.config import ConfigError, parse_config
from bigpipe.ingest.destinations import allowed, is_public, literal_refusal, parse_rule
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    dead_letter_topic,
    dead_letters,
    eventually,
    free_port,
    read_topic,
    unique,
)
from tests.test_config import EXAMPLE

SECRET = "sup3r-secret-value"


# ---------------------------------------------------------------- units
def rules(*texts: str) -> tuple:
    return tuple(parse_rule(t) for t in texts)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://api.example.com/hooks/a", True),
        ("https://api.example.com/hook", False),  # not under the prefix
        ("http://api.example.com/hooks/a", False),  # scheme differs
        ("https://api.example.com:8443/hooks/a", False),  # port differs
        ("https://evil.com/?https://api.example.com/hooks/", False),
        ("http://x.internal.test/any", True),
        ("http://internal.test/any", False),  # *. matches subdomains, not the apex
        ("http://x.internal.test.evil.com/", False),
    ],
)
def test_allow_rules(url: str, ok: bool) -> None:
    assert allowed(rules("https://api.example.com/hooks/", "*.internal.test"), URL(url)) is ok


def test_no_rules_allow_anything_and_bad_rules_are_explained() -> None:
    assert allowed((), URL("http://anything/"))
    assert "neither a URL prefix nor a host pattern" in parse_rule("not a host!")
    assert "http:// or https://" in parse_rule("ftp://x/")


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(address) is public


def test_literal_refusals() -> None:
    assert literal_refusal(URL("http://localhost:80/")) is not None
    assert literal_refusal(URL("http://metadata.google.internal/")) is not None
    assert literal_refusal(URL("http://[::1]/")) is not None
    assert literal_refusal(URL("http://example.com/")) is None  # judged when it resolves
    assert literal_refusal(URL("http://93.184.216.34/")) is None


def test_kafka_client_config_passes_through_but_not_over_owned_keys() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.client.config"] = {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}
    assert parse_config(raw).kafka_client_config["sasl.mechanism"] == "PLAIN"
    raw["kafka.client.config"] = {"enable.auto.commit": True, "x": []}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.problems == [
        "kafka.client.config.enable.auto.commit: is set by Bigpipe itself; remove it",
        "kafka.client.config.x: must be a string, number or boolean",
    ]


def test_message_max_bytes_is_bigpipes_to_set() -> None:
    # The producer sizes its records from http.server.body.limit; a value here was
    # silently overridden, so it is refused like every other setting Bigpipe owns.
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.client.config"] = {"message.max.bytes": 2000}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.problems == [
        "kafka.client.config.message.max.bytes: is set by Bigpipe itself; remove it"
    ]


def test_tls_needs_both_files(tmp_path: Path) -> None:
    raw = {**EXAMPLE, "http.server.tls.cert": str(tmp_path / "absent.pem")}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.problems[0] == (
        "http.server.tls.cert: is set but http.server.tls.key is not; set both, or neither"
    )


# ---------------------------------------------------------------- a guarded node
@pytest.fixture
async def guarded(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], downstream: Downstream
) -> tuple[Bigpipe, str]:
    topic = unique("secure")
    config = base_config(
        kafka, topic, free_port(), consumers=[consumer_entry(topic, unique("g"), retries=0)]
    )
    config["kafka.producer.acl"] = [
        {
            "name": "scoped",
            "secret": SECRET,
            "topic": topic,
            "allow": [f"http://127.0.0.1:{downstream.port}/ok/", "*.example.test"],
        },
        {"name": "guarded", "secret": SECRET, "topic": topic, "denyPrivate": True},
    ]
    config["http.server.read.timeout"] = 1000
    config["log.level"] = 5  # DEBUG: the per-call lines too must never show a secret
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    return bigpipe, topic


async def call_as(
    bigpipe: Bigpipe,
    http: aiohttp.ClientSession,
    name: str,
    url: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    body = {"acl": {"name": name, "secret": SECRET}, "url": url, "data": "d"}
    return await bigpipe.post_raw(http, orjson.dumps(body), headers)


async def test_allowlist_refuses_other_destinations(
    guarded: tuple[Bigpipe, str], http: aiohttp.ClientSession, downstream: Downstream
) -> None:
    bigpipe, _ = guarded
    for url, status in (
        (downstream.url("/ok/1"), 200),
        (downstream.url("/other"), 403),
        ("http://api.example.test/x", 200),
        ("http://example.test/x", 403),
    ):
        got, reply = await call_as(bigpipe, http, "scoped", url)
        assert got == status, (url, reply)
    _, reply = await call_as(bigpipe, http, "scoped", downstream.url("/other"))
    assert reply["msg"] == "url not allowed for caller 'scoped': not in its allow list"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/",
    ],
)
async def test_deny_private_refuses_literal_addresses_at_ingest(
    guarded: tuple[Bigpipe, str], http: aiohttp.ClientSession, url: str
) -> None:
    status, reply = await call_as(guarded[0], http, "guarded", url)
    assert (status, reply["errno"]) == (403, -1)
    assert reply["msg"].endswith("(denyPrivate)")


async def test_deny_private_checks_resolved_addresses_at_delivery(
    guarded: tuple[Bigpipe, str], http: aiohttp.ClientSession, kafka: str, downstream: Downstream
) -> None:
    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    if any(is_public(a) for a in addresses):
        pytest.skip(f"{name} resolves to a public address here: {addresses}")
    bigpipe, _topic = guarded
    status, _ = await call_as(bigpipe, http, "guarded", f"http://{name}:{downstream.port}/x")
    assert status == 200, "a host name passes ingest: only resolution can judge it"
    [letter] = await dead_letters(kafka, bigpipe, 1)
    assert letter["lastError"].startswith("destination refused:")
    assert letter["attempts"] == 1, "a refused destination is final, not retried"
    assert downstream.requests == []


async def fail_on_fail(request: web.Request, _number: int) -> web.Response:
    return web.Response(status=500 if request.path.endswith("/fail") else 200, text="no")


async def test_the_secret_never_shows_in_kafka_logs_stats_or_metrics(
    guarded: tuple[Bigpipe, str], http: aiohttp.ClientSession, kafka: str, downstream: Downstream
) -> None:
    bigpipe, topic = guarded
    downstream.behaviour = fail_on_fail
    headers = {"X-Token": SECRET, "Authorization": f"Bearer {SECRET}"}
    ids = []
    for path in ("/ok/s", "/ok/fail"):  # one delivered, one dead-lettered
        status, reply = await call_as(bigpipe, http, "scoped", downstream.url(path), headers)
        assert status == 200
        ids.append(reply["data"]["id"])
    await eventually(lambda: len(downstream.requests) == 2, 30, "the deliveries")
    # At DEBUG, the failed call has its own log line: the per-call path is exercised.
    await eventually(lambda: ids[1] in bigpipe.log_tail(10_000), 10, "a DEBUG line for the call")
    records = await asyncio.to_thread(read_topic, kafka, topic, 2)
    [letter] = await asyncio.to_thread(read_topic, kafka, dead_letter_topic(bigpipe), 1)
    async with http.get(f"{bigpipe.url}/metrics") as response:
        metrics = await response.text()
    stats = orjson.dumps(await bigpipe.stats(http)).decode()
    delivered = str([r.headers for r in downstream.requests])
    for where, text in (
        ("kafka", "".join(r.value().decode() for r in records)),
        ("dead letter", letter.value().decode()),
        ("log", bigpipe.log_tail(10_000)),
        ("stats", stats),
        ("metrics", metrics),
        ("downstream", delivered),
    ):
        assert SECRET not in text, f"the secret leaked into {where}"


async def test_too_many_headers_is_a_400_not_a_crash(
    guarded: tuple[Bigpipe, str], http: aiohttp.ClientSession
) -> None:
    headers = {f"X-H{i}": "v" for i in range(150)}
    async with http.post(f"{guarded[0].url}/rpc/call", data=b"{}", headers=headers) as response:
        assert response.status == 400  # aiohttp's HTTP parser refuses it, before Bigpipe runs


async def test_slow_headers_are_cut_off(guarded: tuple[Bigpipe, str]) -> None:
    bigpipe, _ = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", bigpipe.port)
    writer.write(b"POST /rpc/call HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    closed_after = None
    for _ in range(50):  # a header byte every 0.1 s: slowloris
        writer.write(b"X")
        try:
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                closed_after = time.monotonic() - started
                break
        except TimeoutError:
            continue
        except ConnectionError:
            closed_after = time.monotonic() - started
            break
    writer.close()
    assert closed_after is not None and closed_after < 2.5, (
        "headers still incomplete after http.server.read.timeout (1 s): the node must hang up"
    )


async def test_tls_listener(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], http: aiohttp.ClientSession
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    config = base_config(
        kafka,
        unique("tls"),
        free_port(),
        **{"http.server.tls.cert": str(cert), "http.server.tls.key": str(key)},
    )
    bigpipe = Bigpipe(config, tmp_path)
    await bigpipe.start(wait_ready=False)
    processes.append(bigpipe)
    context = ssl.create_default_context(cafile=str(cert))

    async def answers_over_tls() -> bool:
        try:
            async with http.get(
                f"https://127.0.0.1:{bigpipe.port}/healthz", ssl=context
            ) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(answers_over_tls, 30, "the node to answer over TLS")
