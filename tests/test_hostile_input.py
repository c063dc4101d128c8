"""Property-based tests: hostile bodies, headers, methods and config files.

Hypothesis draws the inputs; a real Bigpipe process answers them. The tests are
synchronous (hypothesis drives a blocking `http.client`), while the node itself is
started once per module by an async fixture on the session's event loop.

The bugs they found stay pinned by plain tests at the end of the file.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import math
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings
from hypothesis import strategies as st

from bigpipe.calls.callbacks import CALLBACK_FIELDS
from bigpipe.config import Config, ConfigError, parse_config
from bigpipe.config_error import one_line
from bigpipe.ingest.listener import HeaderDeadline
from tests.support import REPO, Bigpipe, base_config, free_port, topic_record_count, unique

BODY_LIMIT = 16_384  # http.server.body.limit of the node under test: small, so bodies reach it
# http.server.batch.body.limit and http.server.batch.calls: small too, for the same reason.
BATCH_BODY_LIMIT = 4 * BODY_LIMIT
BATCH_CALLS = 6
MAX_URL_LENGTH = 8192  # README: url is at most 8192 characters
ACL_NAME = "hostile-caller"
# Random per run and 32 hex digits: no strategy below ever draws it by chance, so only
# the requests that are handed it on purpose can be accepted.
SECRET = uuid.uuid4().hex

# README's errno table: the (HTTP status, errno) pairs a reply may have. 500 is a bug.
DOCUMENTED = {(200, 0), (400, -1), (403, -1), (404, -1), (405, -1), (408, -1), (413, -1), (417, -1)}
DOCUMENTED |= {(503, -1), (503, 1)}
CALL_ID = re.compile(r"^[0-9a-f]{32}$")


def budget(max_examples: int, shrink: bool = True) -> settings:
    """Hypothesis settings: a bounded number of examples, no deadline, no example database."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + [Phase.shrink] * shrink
    return settings(
        max_examples=max_examples,
        phases=phases,
        deadline=None,
        database=None,  # no example database: each run draws afresh
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# ---------------------------------------------------------------- the node
@pytest.fixture(scope="module")
async def node(
    kafka: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Bigpipe, str]]:
    """A node with no consumer group, so an accepted call is stored and never delivered."""
    topic = unique("hostile")
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=1,
        consumers=[],
        **{
            "kafka.producer.acl": [{"name": ACL_NAME, "secret": SECRET, "topic": topic}],
            "http.server.body.limit": BODY_LIMIT,
            "http.server.batch.body.limit": BATCH_BODY_LIMIT,
            "http.server.batch.calls": BATCH_CALLS,
        },
    )
    bigpipe = await Bigpipe(config, tmp_path_factory.mktemp("hostile")).start()
    yield bigpipe, topic
    assert await bigpipe.stop() == 0, bigpipe.log_tail()


def send(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Iterable[tuple[str, str | bytes]] = (),
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection: status, headers and body of the reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def check_reply(
    status: int, headers: http.client.HTTPMessage, raw: bytes, method: str = "POST"
) -> dict[str, Any] | None:
    """Assert the README's reply contract; return the reply (None for HEAD)."""
    assert status != 500, f"internal error: {raw!r}"
    assert headers.get_content_type() == "application/json", (status, headers, raw)
    if method == "HEAD":
        assert raw == b""
        return None
    reply = json.loads(raw)
    check_call_reply(status, reply, {"data", "errno", "msg"})
    return reply


def check_call_reply(status: int, reply: Any, fields: set[str]) -> None:
    """A call's reply: a /rpc/call reply, or one call's outcome in a /rpc/calls reply."""
    assert isinstance(reply, dict) and set(reply) == fields, reply
    errno, msg, data = reply["errno"], reply["msg"], reply["data"]
    assert type(errno) is int and isinstance(msg, str) and msg, reply
    assert (status, errno) in DOCUMENTED, (status, reply)
    if errno == 0:
        assert (
            msg == "success"
            and isinstance(data, dict)
            and set(data) == {"id", "partition", "offset"}
        ), reply
        assert CALL_ID.match(data["id"]), reply
    else:
        assert data is None, reply


# ---------------------------------------------------------------- strategies
# Any Unicode, lone surrogates included: JSON can carry them escaped ("\ud800").
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()  # NaN and infinities become the non-JSON tokens NaN and Infinity
    | any_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def repeated(low: int, high: int) -> st.SearchStrategy[str]:
    """A long string, cheaply: a short piece repeated (up to a few times the body limit)."""
    return st.builds(lambda piece, n: piece * n, any_text.filter(bool), st.integers(low, high))


hosts = st.sampled_from(
    [
        "127.0.0.1",
        "127.0.0.1:1",
        "[::1]",
        "[::1",
        "localhost",
        "",
        ":80",
        "user:pw@127.0.0.1",
        "@",
        "例え.jp",
        "xn--",
        "%zz",
        "a..b",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:x",
    ]
)
urls = st.one_of(
    any_text,
    st.sampled_from(
        [
            "",
            "http://",
            "https://",
            "http:///x",
            "http:/x",
            "//127.0.0.1/x",
            "/relative",
            "ftp://127.0.0.1/",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "HTTP://127.0.0.1/",
            "http://127.0.0.1:1/hook?q=1#frag",
        ]
    ),
    st.builds(
        "{}://{}{}".format,
        st.sampled_from(["http", "https", "HTTPS", "ftp", "ws", ""]),
        hosts | st.text(max_size=12),
        st.text(max_size=20),
    ),
    # Around README's 8192-character cap.
    st.builds(
        lambda n: "http://127.0.0.1:1/" + "a" * n,
        st.integers(MAX_URL_LENGTH - 40, MAX_URL_LENGTH + 40),
    ),
)
# Text with no lone surrogate: most fields are meant to get past the JSON decoder.
plain_text = st.text(max_size=40)
valid_urls = st.builds(
    "{}://{}/{}".format,
    st.sampled_from(["http", "https", "HTTP", "hTTps"]),
    st.sampled_from(["127.0.0.1:1", "[::1]:1", "localhost:1", "example.invalid", "例え.jp"]),
    plain_text,
)
# The real secret now and then (those calls may be accepted); nothing else ever matches.
secrets = st.one_of(st.just(SECRET), plain_text, repeated(1, 2000))
valid_calls = st.fixed_dictionaries(
    {
        "acl": st.fixed_dictionaries(
            {"name": st.just(ACL_NAME) | plain_text, "secret": secrets},
        ),
        "url": valid_urls,
        "data": plain_text | repeated(1, 3 * BODY_LIMIT),
    },
    optional={"partition_key": st.none() | plain_text | repeated(1, 3 * BODY_LIMIT)},
)
FIELDS = ("acl", "url", "data", "partition_key")
# The other fields a call may carry, each checked when present (README, /rpc/call): this
# oracle does not model their rules, so a call holding one is never one that must pass.
CHECKED_FIELDS = ("delay_ms", "ttl_ms", "idempotency_key", *CALLBACK_FIELDS)
# What may replace a field: anything at all, or a string of any kind.
anything = st.one_of(json_values, any_text, urls, repeated(1, 3 * BODY_LIMIT))
perturbations = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(["acl", "url", "data", "partition_key"])),
    st.tuples(st.just("set"), st.sampled_from(["acl", "url", "data", "partition_key"]), anything),
    st.tuples(st.just("set"), st.just("url"), urls),
    st.tuples(st.just("drop acl"), st.sampled_from(["name", "secret"])),
    st.tuples(st.just("set acl"), any_text | st.sampled_from(["name", "secret"]), anything),
    st.tuples(st.just("extra"), any_text, json_values),
)


def perturb(call: dict[str, Any], changes: list[tuple[Any, ...]]) -> dict[str, Any]:
    call = {**call, "acl": dict(call["acl"])}
    for op, key, *value in changes:
        if op == "drop":
            call.pop(key, None)
        elif op in ("set", "extra"):
            call[key] = value[0]
        elif isinstance(call.get("acl"), dict):
            if op == "drop acl":
                call["acl"].pop(key, None)
            else:
                call["acl"][key] = value[0]
    return call


# A valid call (with or without the real secret), with nought to three things wrong.
near_valid_calls = st.builds(perturb, valid_calls, st.lists(perturbations, max_size=3))
# Calls that must be accepted while they fit the body limit: right name and secret,
# any data, key and extra fields.
good_calls = st.builds(
    lambda call, extra: {
        **extra,
        **call,
        "acl": {**call["acl"], "name": ACL_NAME, "secret": SECRET},
    },
    valid_calls,
    st.dictionaries(
        any_text.filter(lambda k: k not in FIELDS + CHECKED_FIELDS), json_values, max_size=3
    ),
)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON text of `value`: escaped (\\ud800) or raw, where raw lone surrogates are bad UTF-8."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


def padded(document: dict[str, Any], size: int) -> bytes:
    """`document` as ASCII JSON of `size` bytes (or more, if it is larger): a "pad" field."""
    body = encode({**document, "pad": ""}, ascii_only=True)
    return encode({**document, "pad": "x" * max(0, size - len(body))}, ascii_only=True)


@st.composite
def padded_to_the_limit(draw: st.DrawFn) -> bytes:
    """A call, good or not, padded to within a few bytes of the body limit, either side."""
    return padded(draw(near_valid_calls | good_calls), BODY_LIMIT + draw(st.integers(-3, 3)))


bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(encode, json_values, st.booleans()),
    st.builds(encode, near_valid_calls, st.booleans()),
    st.builds(encode, near_valid_calls, st.booleans()),
    st.builds(encode, near_valid_calls, st.booleans()),
    padded_to_the_limit(),
    st.builds(encode, good_calls, st.booleans()),
    st.builds(encode, good_calls, st.booleans()),
    # Valid JSON text with stray bytes after it, or cut short.
    st.builds(
        lambda b, tail: b + tail,
        st.builds(encode, near_valid_calls, st.just(True)),
        st.binary(min_size=1, max_size=5),
    ),
    st.builds(
        lambda b, n: b[: max(0, len(b) - n)],
        st.builds(encode, near_valid_calls, st.just(True)),
        st.integers(1, 20),
    ),
)


# ---------------------------------------------------------------- bodies
GOOD_CALL = {"acl": {"name": ACL_NAME, "secret": SECRET}, "url": "http://127.0.0.1:1/", "data": ""}


def good_call_in(body: bytes) -> dict[str, Any] | None:
    """The call in `body` when it is one that must be accepted, else None."""
    try:
        call = orjson.loads(body)  # the server's decoder: it refuses lone surrogates
    except orjson.JSONDecodeError:
        return None
    return call if is_good_call(call) else None


def is_good_call(call: Any) -> bool:
    """Must this decoded call (its acl included) be accepted?"""
    if not isinstance(call, dict) or not isinstance(acl := call.get("acl"), dict):
        return False
    strings = [acl.get("name"), acl.get("secret"), call.get("url"), call.get("data")]
    key = call.get("partition_key")
    if not all(isinstance(s, str) for s in strings) or not isinstance(key, str | None):
        return False
    if (acl["name"], acl["secret"]) != (ACL_NAME, SECRET):
        return False
    if any(field in call for field in CHECKED_FIELDS):
        return False
    ok_url = re.fullmatch(
        r"(?i:https?)://(127\.0\.0\.1:1|\[::1\]:1|localhost:1|example\.invalid|例え\.jp)/.*",
        call["url"],
        re.S,
    )
    return bool(ok_url) and len(call["url"]) <= MAX_URL_LENGTH


def test_hostile_bodies_get_documented_replies_and_only_accepted_calls_reach_kafka(
    node: tuple[Bigpipe, str], kafka: str
) -> None:
    bigpipe, topic = node
    before = topic_record_count(kafka, topic)
    accepted: list[str] = []
    statuses: set[int] = set()

    @budget(150)
    @given(body=bodies)
    # Drawn in a CI run (Hypothesis also draws the code's own string constants): the
    # right caller and a valid url, with an optional field the server checks gone wrong.
    @example(body=encode({**GOOD_CALL, "delay_ms": []}, ascii_only=True))
    def property_(body: bytes) -> None:
        status, headers, raw = send(bigpipe.port, "POST", "/rpc/call", body)
        reply = check_reply(status, headers, raw)
        assert reply is not None
        event(f"HTTP {status}")
        statuses.add(status)
        if len(body) > BODY_LIMIT:
            assert status == 413, (len(body), reply)
        if SECRET.encode() not in body:
            assert reply["errno"] != 0, reply
        elif len(body) <= BODY_LIMIT and (call := good_call_in(body)) is not None:
            assert status == 200, (call, reply)
        if reply["errno"] == 0:
            accepted.append(reply["data"]["id"])

    property_()
    # Every reply but errno 0 wrote nothing; each errno 0 wrote exactly one record.
    assert topic_record_count(kafka, topic) - before == len(accepted)
    assert len(set(accepted)) == len(accepted)
    # The draws reached every outcome, acceptance included.
    assert {200, 400, 403, 413} <= statuses, statuses


# ---------------------------------------------------------------- batches
RIGHT_ACL = {"name": ACL_NAME, "secret": SECRET}
batch_acls = st.one_of(
    st.just(RIGHT_ACL),
    st.just(RIGHT_ACL),
    st.fixed_dictionaries({"name": st.just(ACL_NAME) | plain_text, "secret": secrets}),
    json_values,
)
# Calls as a batch holds them: their own acl, if any, is just a field the batch ignores.
batch_calls = st.lists(
    st.one_of(near_valid_calls, good_calls, json_values), max_size=BATCH_CALLS + 2
)
batch_documents = st.one_of(
    st.fixed_dictionaries({"acl": batch_acls, "calls": batch_calls}),
    st.fixed_dictionaries({"acl": batch_acls}, optional={"calls": anything}),
    st.fixed_dictionaries({"calls": batch_calls}, optional={"acl": anything}),
    json_values,
)


@st.composite
def batch_padded_to_the_limit(draw: st.DrawFn) -> bytes:
    """A batch padded to within a few bytes of the batch body limit, either side."""
    document = draw(st.fixed_dictionaries({"acl": batch_acls, "calls": batch_calls}))
    return padded(document, BATCH_BODY_LIMIT + draw(st.integers(-3, 3)))


right_acl_batches = st.fixed_dictionaries({"acl": st.just(RIGHT_ACL), "calls": batch_calls})
wrong_acl_batches = st.fixed_dictionaries(
    {
        "acl": st.fixed_dictionaries({"name": plain_text, "secret": plain_text}),
        "calls": batch_calls,
    }
)
batch_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(encode, wrong_acl_batches, st.booleans()),
    st.builds(encode, right_acl_batches, st.booleans()),
    st.builds(encode, right_acl_batches, st.booleans()),
    st.builds(encode, batch_documents, st.booleans()),
    st.builds(encode, batch_documents, st.booleans()),
    st.builds(encode, batch_documents, st.booleans()),
    batch_padded_to_the_limit(),
    st.builds(  # valid JSON text cut short
        lambda b, n: b[: max(0, len(b) - n)],
        st.builds(encode, batch_documents, st.just(True)),
        st.integers(1, 20),
    ),
)


def must_accept_in_batch(document: dict[str, Any], call: Any) -> bool:
    """Must this call of a well-formed batch from the right caller be accepted?"""
    if not isinstance(call, dict) or len(orjson.dumps(call)) > BODY_LIMIT:
        return False
    return is_good_call({**call, "acl": document["acl"]})


def test_hostile_batches_get_documented_replies_and_only_accepted_calls_reach_kafka(
    node: tuple[Bigpipe, str], kafka: str
) -> None:
    bigpipe, topic = node
    before = topic_record_count(kafka, topic)
    accepted: list[str] = []
    statuses: set[int] = set()
    call_statuses: set[int] = set()

    @budget(120)
    @given(body=batch_bodies)
    def property_(body: bytes) -> None:
        status, headers, raw = send(bigpipe.port, "POST", "/rpc/calls", body)
        assert status != 500, f"internal error: {raw!r}"
        assert headers.get_content_type() == "application/json", (status, raw)
        reply = json.loads(raw)
        event(f"HTTP {status}")
        statuses.add(status)
        if len(body) > BATCH_BODY_LIMIT:
            assert status == 413, (len(body), reply)
        if SECRET.encode() not in body:
            assert status != 200, reply  # the batch's ACL cannot be right
        if status != 200:
            check_call_reply(status, reply, {"data", "errno", "msg"})
            assert reply["errno"] == -1, reply  # the whole batch: retrying cannot help
            return
        document = orjson.loads(body)
        calls = document["calls"]
        assert document["acl"] == RIGHT_ACL and len(calls) <= BATCH_CALLS, reply
        outcomes = reply["data"]
        assert reply["errno"] == 0 and len(outcomes) == len(calls), reply
        for call, outcome in zip(calls, outcomes, strict=True):
            check_call_reply(outcome.get("status"), outcome, {"data", "errno", "msg", "status"})
            call_statuses.add(outcome["status"])
            if must_accept_in_batch(document, call):
                assert outcome["status"] == 200, (call, outcome)
            if outcome["errno"] == 0:
                accepted.append(outcome["data"]["id"])
        ok = sum(outcome["errno"] == 0 for outcome in outcomes)
        assert reply["msg"] == f"{ok} of {len(calls)} calls accepted", reply

    property_()
    # Each errno 0 wrote exactly one record; nothing else wrote any.
    assert topic_record_count(kafka, topic) - before == len(accepted)
    assert len(set(accepted)) == len(accepted)
    assert {200, 400, 403, 413} <= statuses, statuses
    assert {200, 400} <= call_statuses, call_statuses


# ---------------------------------------------------------------- headers and methods
TOKEN = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Headers that frame the message or change the protocol: random values there are not
# "a header", they are a different request (and some are known bugs, tested below).
FRAMING = {
    "content-length",
    "transfer-encoding",
    "content-encoding",
    "host",
    "expect",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
}
header_names = st.text(TOKEN, min_size=1, max_size=40).filter(lambda n: n.lower() not in FRAMING)
# VCHAR, SP, HTAB and obs-text (0x80-0xFF), as RFC 9110 allows.
field_characters = st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(
    lambda c: c != "\x7f"
)
header_values = st.one_of(
    st.text(field_characters | st.just("\t"), max_size=200),
    st.builds(lambda n: "v" * n, st.integers(1000, 8190)),
)
# README: at most 100 headers (send() adds Host and Content-Length) of at most 8190 bytes.
header_lists = st.lists(st.tuples(header_names, header_values), max_size=98)


def good_call(secret: str) -> bytes:
    call = {"acl": {"name": ACL_NAME, "secret": secret}, "url": "http://127.0.0.1:1/hook"}
    return json.dumps({**call, "data": "hello", "partition_key": "k"}).encode()


def test_hostile_headers_and_methods_get_documented_replies(
    node: tuple[Bigpipe, str], kafka: str
) -> None:
    bigpipe, topic = node
    before = topic_record_count(kafka, topic)
    accepted = 0

    @budget(60)
    @given(
        method=st.just("POST")
        | st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        headers=header_lists,
        secret=st.sampled_from([SECRET, "not-the-secret"]),
        with_body=st.booleans(),
    )
    def property_(
        method: str, headers: list[tuple[str, str]], secret: str, with_body: bool
    ) -> None:
        nonlocal accepted
        body = good_call(secret) if with_body or method == "POST" else None
        status, reply_headers, raw = send(bigpipe.port, method, "/rpc/call", body, headers)
        reply = check_reply(status, reply_headers, raw, method)
        event(f"{method} {status}")
        if method != "POST":
            assert status == 405, (status, reply)
            if reply is not None:
                assert reply["errno"] == -1
            return
        assert reply is not None
        assert status == (200 if secret == SECRET else 403), reply
        accepted += reply["errno"] == 0

    property_()
    assert accepted > 0
    assert topic_record_count(kafka, topic) - before == accepted


# ---------------------------------------------------------------- config files
REFERENCE = json.loads((REPO / "config" / "bigpipe.json").read_text())
# Top-level keys of README's config reference: a problem may name one even when absent.
README_KEYS = {
    "log.level",
    "log.directory",
    "log.format",
    "kafka.bootstrap.servers",
    "kafka.topics",
    "kafka.producer.retries",
    "kafka.producer.ack.timeout",
    "kafka.producer.acl",
    "kafka.consumer.list",
    "http.server.host",
    "http.server.port",
    "http.server.handler.channel.size",
    "http.server.read.timeout",
    "http.server.write.timeout",
    "http.server.body.limit",
    "http.server.shutdown.timeout",
}
config_keys = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
config_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)  # JSON (orjson) has neither NaN nor Infinity...
    | st.floats(allow_nan=True)  # ...but parse_config must cope with any float
    | config_keys
)
config_values = st.recursive(
    config_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(config_keys, inner, max_size=4),
    max_leaves=15,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document: () is the root."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, (*prefix, index))
    return found


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@st.composite
def mutated_reference(draw: st.DrawFn) -> Any:
    """config/bigpipe.json with keys removed, retyped or added, at any depth."""
    doc = json.loads(json.dumps(REFERENCE))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(doc)))
        op = draw(st.sampled_from(["remove", "retype", "add"]))
        if not path:
            if op == "retype":
                return draw(config_values)
            op = "add"
        target = _at(doc, path)
        if op == "add" and isinstance(target, dict):
            key = draw(
                st.sampled_from(sorted(README_KEYS))
                | config_keys
                | st.sampled_from(
                    [
                        "rateLimit",
                        "ratelimit",
                        "secret_sha256",
                        "minInsyncReplicas",
                        "circuitBreaker",
                        "deadLetterTopic",
                        "retryStatus",
                        "maxBuffered",
                        "backoffBase",
                        "backoffMax",
                    ]
                )
            )
            target[key] = draw(config_values)
        elif op == "add" and isinstance(target, list):
            target.append(draw(config_values))
        elif path:
            parent, last = _at(doc, path[:-1]), path[-1]
            if op == "remove":
                del parent[last]
            else:
                parent[last] = draw(config_values)
    return doc


config_documents = st.one_of(
    config_values,
    st.dictionaries(config_keys | st.sampled_from(sorted(README_KEYS)), config_values, max_size=8),
    mutated_reference(),
    mutated_reference(),
)


def check_config_outcome(raw: Any) -> Config | ConfigError:
    """parse_config gives a Config, or a ConfigError whose problems are one line each."""
    try:
        return parse_config(raw)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError with no problem"
        keys = set(raw) if isinstance(raw, dict) else set()
        namable = {"config"} | README_KEYS | {one_line(k) for k in keys if isinstance(k, str)}
        for problem in exc.problems:
            assert isinstance(problem, str) and problem.strip(), exc.problems
            assert "\n" not in problem and "\r" not in problem, problem
            assert any(
                problem.startswith(key) and problem[len(key) : len(key) + 1] in (":", ".", "[", ",")
                for key in namable
            ), f"problem names no key path: {problem!r}"
        return exc


@budget(200)
@given(raw=config_documents)
def test_any_config_document_gives_a_config_or_one_line_problems(raw: Any) -> None:
    outcome = check_config_outcome(raw)
    event("valid" if isinstance(outcome, Config) else "rejected")


def test_the_reference_config_parses() -> None:
    assert isinstance(check_config_outcome(REFERENCE), Config)


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bigpipe", "-config", str(path), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check_cli_outcome(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 2), (result.returncode, result.stderr)
    if result.returncode == 0:
        assert result.stdout == "config ok\n" and result.stderr == ""
    else:
        lines = result.stderr.removesuffix("\n").split("\n")  # a terminal's lines: \n only
        assert lines and all(line.startswith("bigpipe: config error: ") for line in lines), lines


def test_cli_check_on_mutated_configs(tmp_path: Path) -> None:
    path = tmp_path / "bigpipe.json"

    @budget(8, shrink=False)  # a process per example: shrinking would take minutes
    @given(raw=mutated_reference() | config_values)
    def property_(raw: Any) -> None:
        try:
            text = json.dumps(raw, allow_nan=False)
        except ValueError:
            assume(False)  # NaN and infinities have no JSON text
        path.write_text(text)
        result = run_check(path)
        check_cli_outcome(result)
        # What the CLI parsed: orjson reads integers past 64 bits as floats.
        valid = isinstance(check_config_outcome(orjson.loads(text)), Config)
        assert (result.returncode == 0) == valid, result.stderr

    property_()


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff\xfe{}", b"[]", b"null", b"{", b"1e400", b'{"a": NaN}', b"\x00" * 10],
    ids=["empty", "bad-utf8", "list", "null", "truncated", "huge-number", "nan", "nul-bytes"],
)
def test_cli_check_on_broken_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bigpipe.json"
    path.write_bytes(content)
    result = run_check(path)
    check_cli_outcome(result)
    assert result.returncode == 2


def test_cli_check_on_a_missing_file_and_a_directory(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.json", tmp_path):
        result = run_check(path)
        check_cli_outcome(result)
        assert result.returncode == 2


# ---------------------------------------------------------------- edges, and the bugs found
def post_call(bigpipe: Bigpipe, secret: str, headers: Iterable[tuple[str, str | bytes]] = ()):
    return send(bigpipe.port, "POST", "/rpc/call", good_call(secret), headers)


def test_header_value_with_obs_text_is_not_an_internal_error(
    node: tuple[Bigpipe, str], kafka: str
) -> None:
    bigpipe, topic = node
    before = topic_record_count(kafka, topic)
    status, headers, raw = post_call(bigpipe, SECRET, [("X-Note", b"caf\xe9")])
    check_reply(status, headers, raw)  # accepted, or refused as a 400: either, but no 500
    assert topic_record_count(kafka, topic) - before == (status == 200)


def test_undecodable_compressed_body_is_a_400(node: tuple[Bigpipe, str]) -> None:
    bigpipe, _ = node
    status, headers, raw = post_call(bigpipe, "not-the-secret", [("Content-Encoding", "gzip")])
    check_reply(status, headers, raw)
    assert status == 400


def test_gzip_body_is_decoded(node: tuple[Bigpipe, str]) -> None:
    """The supported half of the above: a real gzip body is read like a plain one."""
    bigpipe, _ = node
    body = gzip.compress(good_call("not-the-secret"))
    status, headers, raw = send(
        bigpipe.port, "POST", "/rpc/call", body, [("Content-Encoding", "gzip")]
    )
    check_reply(status, headers, raw)
    assert status == 403


def test_documented_header_limits(node: tuple[Bigpipe, str]) -> None:
    """README: at most 100 headers of at most 8190 bytes; past that a plain 400 (no JSON)."""
    bigpipe, _ = node
    for headers, documented_limit in (
        ([(f"X-H{i}", "v") for i in range(98)], False),  # 100 with Host and Content-Length
        ([("X-Big", "v" * 8190)], False),
        ([(f"X-H{i}", "v") for i in range(99)], True),
        ([("X-Big", "v" * 9000)], True),
    ):
        status, reply_headers, raw = post_call(bigpipe, "not-the-secret", headers)
        if documented_limit:
            assert status == 400, raw
        else:
            check_reply(status, reply_headers, raw)
            assert status == 403


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Encoding", "br")],  # 400 "Can not decode content-encoding: brotli (br)"
        [("Content-Encoding", "zstd")],  # 400 "Can not decode content-encoding: zstandard"
    ],
    ids=["content-encoding-br", "content-encoding-zstd"],
)
def test_http_layer_refusals_are_documented_plain_4xx(
    node: tuple[Bigpipe, str], headers: list
) -> None:
    """README: what the HTTP layer cannot decode gets a plain-text 4xx before Bigpipe runs."""
    bigpipe, _ = node
    status, reply_headers, _ = post_call(bigpipe, "not-the-secret", headers)
    assert status == 400
    assert reply_headers.get("Content-Type", "").startswith("text/plain")


def test_an_unknown_expectation_gets_a_json_417(node: tuple[Bigpipe, str]) -> None:
    bigpipe, _ = node
    status, reply_headers, raw = post_call(bigpipe, "not-the-secret", [("Expect", "x-teapot")])
    reply = check_reply(status, reply_headers, raw)
    assert (status, reply["errno"]) == (417, -1)
    assert "Expect" in reply["msg"]


def test_405_names_the_allowed_method(node: tuple[Bigpipe, str]) -> None:
    bigpipe, _ = node
    status, headers, _ = send(bigpipe.port, "GET", "/rpc/call")
    assert status == 405
    assert headers.get("Allow") == "POST"


@pytest.mark.parametrize("url", ["http://a b/", "http://a\u0000b/", "http://<>/"])
def test_url_with_an_invalid_host_is_a_400(node: tuple[Bigpipe, str], kafka: str, url: str) -> None:
    bigpipe, topic = node
    before = topic_record_count(kafka, topic)
    body = json.dumps({"acl": {"name": ACL_NAME, "secret": SECRET}, "url": url, "data": ""})
    status, headers, raw = send(bigpipe.port, "POST", "/rpc/call", body.encode())
    check_reply(status, headers, raw)
    assert status == 400
    assert topic_record_count(kafka, topic) == before


def test_unknown_key_with_a_newline_is_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**REFERENCE, "bad\nkey": 1})
    assert all("\n" not in problem for problem in caught.value.problems), caught.value.problems


def test_float_infinity_and_nan_never_crash_the_parser() -> None:
    """JSON has no such numbers, but parse_config takes any decoded document."""
    for value in (math.inf, -math.inf, math.nan):
        raw = json.loads(json.dumps(REFERENCE))
        raw["kafka.consumer.list"][0]["rateLimit"] = value
        check_config_outcome(raw)


async def test_header_deadline_spares_a_request_whose_body_came_separately() -> None:
    read_timeout = 0.3

    async def waits_for_kafka(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(2 * read_timeout)  # Kafka acknowledges after a while
        return web.Response(text="stored")

    server = web.Server(waits_for_kafka)
    listener = await asyncio.get_running_loop().create_server(
        lambda: HeaderDeadline(server(), read_timeout), "127.0.0.1", 0
    )
    try:
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"hello")  # the body, in a segment of its own
        reply = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply
    finally:
        listener.close()
        await server.shutdown()
