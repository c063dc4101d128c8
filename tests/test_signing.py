"""Signed deliveries: every attempt verifies with the Standard Webhooks reference code.

Its `verify` also parses the body as JSON, so the calls here carry JSON.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bigpipe.config import ConfigError, parse_config
from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    Downstream,
    Received,
    base_config,
    consumer_entry,
    dead_letter_topic,
    eventually,
    free_port,
    read_topic,
    unique,
)

OLD = "whsec_" + base64.b64encode(b"o" * 32).decode()
NEW = "whsec_" + base64.b64encode(b"n" * 32).decode()
STRANGER = "whsec_" + base64.b64encode(b"s" * 32).decode()


def signed_config(kafka: str, **entry: object) -> dict:
    topic = unique("signed")
    config = base_config(
        kafka, topic, free_port(), consumers=[consumer_entry(topic, unique("g"), **entry)]
    )
    config["kafka.producer.acl"][0]["signing"] = {"secrets": [NEW, OLD]}
    config["log.level"] = 5  # DEBUG: the per-call lines too must never show a secret
    return config


def verifies(secret: str, received: Received, body: bytes | None = None) -> bool:
    try:
        Webhook(secret).verify(received.body if body is None else body, received.headers)
    except WebhookVerificationError:
        return False
    return True


async def test_a_thousand_deliveries_verify_with_either_secret_and_a_tampered_body_fails(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    bigpipe = await Bigpipe(signed_config(kafka, concurrency=50), tmp_path).start()
    processes.append(bigpipe)
    ids: list[str] = []
    for start in range(0, 1000, 100):
        replies = await asyncio.gather(
            *(
                bigpipe.post_call(http, orjson.dumps({"n": n, "t": "✓"}).decode(), downstream.url())
                for n in range(start, start + 100)
            )
        )
        ids.extend(reply["data"]["id"] for _, reply in replies)
    await eventually(lambda: downstream.call_ids() >= set(ids), 120, "1,000 deliveries")
    for received in downstream.requests:
        assert received.headers["webhook-id"] == received.call_id
        assert verifies(NEW, received), "a receiver that knows only the new secret"
        assert verifies(OLD, received), "a receiver that knows only the old secret"
        assert not verifies(STRANGER, received)
    tampered = downstream.requests[0]
    assert not verifies(NEW, tampered, tampered.body.replace(b'"n":', b'"n":1'))


async def fail_twice(_request: web.Request, number: int) -> web.Response:
    return web.Response(status=503 if number < 2 else 200)


async def test_retries_keep_the_id_and_sign_afresh(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = fail_twice
    bigpipe = await Bigpipe(signed_config(kafka, retries=3), tmp_path).start()
    processes.append(bigpipe)
    _, reply = await bigpipe.post_call(http, "{}", downstream.url())
    await eventually(lambda: len(downstream.requests) == 3, 30, "three attempts")
    assert {r.headers["webhook-id"] for r in downstream.requests} == {reply["data"]["id"]}
    assert all(verifies(NEW, r) for r in downstream.requests)


async def test_a_caller_cannot_forge_the_signature_headers(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    config = signed_config(kafka)
    del config["kafka.producer.acl"][0]["signing"]
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    forged = {"Webhook-Id": "x", "Webhook-Timestamp": "1", "Webhook-Signature": "v1,Zm9v"}
    payload = {
        "acl": {"name": ACL_NAME, "secret": ACL_SECRET},
        "url": downstream.url(),
        "data": "{}",
    }
    await bigpipe.post_raw(http, orjson.dumps(payload), forged)
    await eventually(lambda: len(downstream.requests) == 1, 30, "the delivery")
    names = {name.lower() for name in downstream.requests[0].headers}
    assert not names & {"webhook-id", "webhook-timestamp", "webhook-signature"}


async def test_signing_secrets_never_show_in_kafka_logs_stats_or_metrics(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = fail_on_fail
    bigpipe = await Bigpipe(signed_config(kafka, retries=0), tmp_path).start()
    processes.append(bigpipe)
    for path in ("/ok", "/fail"):  # one delivered, one dead-lettered
        status, _ = await bigpipe.post_call(http, "d", downstream.url(path))
        assert status == 200
    await eventually(lambda: len(downstream.requests) == 2, 30, "the deliveries")
    records = await asyncio.to_thread(
        read_topic, kafka, bigpipe.config["kafka.topics"][0]["name"], 2
    )
    [letter] = await asyncio.to_thread(read_topic, kafka, dead_letter_topic(bigpipe), 1)
    async with http.get(f"{bigpipe.url}/metrics") as response:
        metrics = await response.text()
    stats = orjson.dumps(await bigpipe.stats(http)).decode()
    texts = {
        "kafka": "".join(r.value().decode() for r in records),
        "dead letter": letter.value().decode(),
        "log": bigpipe.log_tail(10_000),
        "stats": stats,
        "metrics": metrics,
        "downstream": str([r.headers for r in downstream.requests]),
    }
    for secret in (NEW, OLD):
        for where, text in texts.items():
            assert secret not in text and secret[6:] not in text, f"a secret leaked: {where}"


async def fail_on_fail(request: web.Request, _number: int) -> web.Response:
    return web.Response(status=500 if request.path.endswith("/fail") else 200)


@pytest.mark.parametrize(
    ("secrets", "problem"),
    [
        ([], "signing.secrets: is empty; list at least one secret"),
        (["nope" + NEW[6:]], "signing.secrets[0]: must start with 'whsec_'"),
        (["whsec_!!!" + NEW[9:]], "signing.secrets[0]: is not whsec_ followed by base64"),
        ([NEW, "whsec_" + base64.b64encode(b"x" * 8).decode()], "signing.secrets[1]: decodes to 8"),
    ],
)
def test_bad_signing_secrets_are_named_and_never_echoed(secrets: list[str], problem: str) -> None:
    raw = base_config("127.0.0.1:9092", "t", 10086)
    raw["kafka.producer.acl"][0]["signing"] = {"secrets": secrets}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    [line] = caught.value.problems
    assert line.startswith(f"kafka.producer.acl[0].{problem}"), line
    for secret in secrets:
        assert secret[6:] not in line


def test_a_signer_repr_names_no_secret() -> None:
    raw = base_config("127.0.0.1:9092", "t", 10086)
    raw["kafka.producer.acl"][0]["signing"] = {"secrets": [NEW, OLD]}
    text = repr(parse_config(raw))
    assert "Signer(2 secrets)" in text
    assert NEW[6:] not in text and OLD[6:] not in text
