"""The HTTP side: `/rpc/call` and `/rpc/calls` (batch) ingest, `/stats`, `/metrics`, health,
the dashboard, the OpenAPI document and the `/rpc/server/mock` downstream.

Every API reply (ingest, stats, health, and every error) is `{"errno", "msg", "data"}`
as JSON, with an HTTP status that matches: a caller can branch on either.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import ipaddress
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import orjson
from aiohttp import HttpVersion11, web
from yarl import URL

from bigpipe.calls.callbacks import CALLBACK_FIELDS
from bigpipe.calls.dedup import MAX_KEY_LENGTH, IdempotencyIndex
from bigpipe.calls.envelope import Call, encode_call, forwardable_headers, new_call
from bigpipe.calls.status import StatusLog
from bigpipe.calls.status_view import StatusView
from bigpipe.config import AclEntry, Config
from bigpipe.ingest.acl import Acl
from bigpipe.ingest.compat import (
    GO_ACCEPTED,
    GO_BAD_DATA,
    GO_BAD_JSON,
    GO_BAD_URL,
    GO_CONTENT_TYPE,
    GO_INTERNAL,
    GO_OVERLOADED,
    GO_REFUSED,
    go_field_problem,
    go_reply_body,
)
from bigpipe.ingest.destinations import refusal
from bigpipe.ingest.listener import request_done
from bigpipe.ingest.producer import Placed, ProduceFailed, Producer
from bigpipe.metrics import CONTENT_TYPE, Latencies, Sample, render
from bigpipe.stats import Stats

log = logging.getLogger(__name__)

OK, CALLER_ERROR, INTERNAL_ERROR = 0, -1, 1
MAX_URL_LENGTH = 8192
HOST_NAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+")
# One self-contained page (no CDN: Bigpipe often runs where the internet is not).
DASHBOARD_HTML = (resources.files("bigpipe") / "dashboard.html").read_bytes()
OPENAPI_JSON = (resources.files("bigpipe") / "openapi.json").read_bytes()


class ServedNode(Protocol):
    """What the HTTP side needs of a node. The node (bigpipe.node.app) composes ingest,
    delivery and the server; this protocol keeps the server from importing it back."""

    config: Config
    stats: Stats
    latencies: Latencies
    acl: Acl
    producer: Producer | None
    index: IdempotencyIndex
    status_log: StatusLog | None
    status_view: StatusView | None
    ingest: Ingest

    @property
    def ready(self) -> bool: ...

    def not_ready_reason(self) -> str: ...

    def node_ready(self) -> bool: ...

    def view(self) -> tuple[Stats, list[Sample], bool]: ...


class Reject(Exception):
    """A call refused before it reaches Kafka: nothing is written."""

    def __init__(
        self,
        status: int,
        msg: str,
        errno: int = CALLER_ERROR,
        go: tuple[int, str] | None = None,
    ) -> None:
        super().__init__(msg)
        self.status = status
        self.errno = errno
        self.msg = msg
        self.go = go  # the original's (errno, msg), for http.server.compat.replies


GO_UNREADABLE = (INTERNAL_ERROR, GO_INTERNAL)  # the original's answer to a body it cannot read


def go_reply(errno: int, msg: str) -> web.Response:
    """A reply as the Go original gave it: HTTP 200 whatever happened, data ""."""
    body = go_reply_body(errno, msg)
    return web.Response(body=body, status=200, headers={"Content-Type": GO_CONTENT_TYPE})


def go_refusal(exc: Reject) -> web.Response:
    """A refusal in the original's words; the errno stays ours, so errno 1 still means
    "retry later" and -1 "retrying cannot help"."""
    if exc.go is not None:
        return go_reply(*exc.go)
    if exc.errno == INTERNAL_ERROR:
        msg = GO_INTERNAL
    elif exc.status == 403:
        msg = GO_REFUSED
    elif exc.status == 503:
        msg = GO_OVERLOADED
    elif exc.status == 413:
        msg = GO_BAD_DATA
    elif exc.status == 400:  # past the original's field checks, only the url can be wrong
        msg = GO_BAD_URL
    else:
        msg = GO_INTERNAL
    return go_reply(exc.errno, msg)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs more per call
class CallRequest:
    name: str
    secret: str
    url: str
    target: URL
    data: str
    partition_key: str | None
    delay_ms: int = 0
    ttl_ms: int | None = None
    idempotency_key: str | None = None
    callbacks: dict[str, str] = field(default_factory=dict)  # field name -> URL


@dataclass(slots=True)
class Batch:
    """What the calls of one /rpc/calls batch share."""

    entry: AclEntry
    secret: str
    headers: dict[str, str]  # forwarded with each call
    started: float
    check_size: bool  # the body is over http.server.body.limit: measure each call
    keyed: dict[str, asyncio.Event] = field(default_factory=dict)  # key -> its last call, done
    admitted: int = 0  # places it holds among the calls waiting for Kafka


BATCH_PATH = "/rpc/calls"


def reply(status: int, errno: int, msg: str, data: Any = None) -> web.Response:
    body = orjson.dumps({"data": data, "errno": errno, "msg": msg})
    return web.Response(body=body, status=status, content_type="application/json")


def parse_call_request(body: bytes, max_delay_ms: int, compat: bool = False) -> CallRequest:
    """Decode and check a /rpc/call body; raise Reject naming the first bad field. With
    `compat` (http.server.compat.replies), the field the Go original would name first, in
    its words: from the same decoded body (a large body decoded twice cost as much again)."""
    payload = _decode(body)
    if compat and (problem := go_field_problem(payload)) is not None:
        raise Reject(400, problem, go=(CALLER_ERROR, problem))
    if not isinstance(payload, dict):
        raise Reject(400, "body must be a JSON object")
    name, secret = _acl(payload)
    return parse_call(payload, name, secret, max_delay_ms)


def parse_batch_request(body: bytes, max_calls: int) -> tuple[str, str, list[Any]]:
    """Decode and check a /rpc/calls body, {acl, calls}: the caller's name and secret, and
    the calls, each still to be checked on its own (parse_call)."""
    payload = _decode(body)
    if not isinstance(payload, dict):
        raise Reject(400, "body must be a JSON object {acl, calls}")
    name, secret = _acl(payload)
    calls = payload.get("calls")
    if calls is None:
        raise Reject(400, "field calls: is missing; give an array of calls {url, data, ...}")
    if not isinstance(calls, list):
        raise Reject(400, "field calls: must be an array of calls {url, data, ...}")
    if len(calls) > max_calls:
        raise Reject(
            413,
            f"field calls: {len(calls)} calls, over the limit of {max_calls}"
            " (http.server.batch.calls); split the batch",
        )
    return name, secret, calls


def _decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Reject(400, f"invalid JSON body: {exc}", go=(CALLER_ERROR, GO_BAD_JSON)) from None


def _acl(payload: dict[str, Any]) -> tuple[str, str]:
    acl = payload.get("acl")
    if not isinstance(acl, dict):
        raise Reject(400, "field acl: must be an object {name, secret}")
    return _string(acl, "name", "acl.name"), _string(acl, "secret", "acl.secret")


def parse_call(payload: dict[str, Any], name: str, secret: str, max_delay_ms: int) -> CallRequest:
    """Check one call's fields (a /rpc/call body, or one call of a /rpc/calls batch)."""
    url = _string(payload, "url", "url")
    data = _string(payload, "data", "data")
    partition_key = payload.get("partition_key")
    if partition_key is not None and not isinstance(partition_key, str):
        raise Reject(400, "field partition_key: must be a string when given")
    delay_ms = _whole_ms(payload, "delay_ms", 0, max_delay_ms, "kafka.delay.max") or 0
    ttl_ms = _whole_ms(payload, "ttl_ms", 1, None, "")
    idempotency_key = payload.get("idempotency_key")
    if idempotency_key is not None:
        _check_idempotency_key(idempotency_key, "field idempotency_key")
    target = _parse_url(url)
    return CallRequest(
        name,
        secret,
        url,
        target,
        data,
        partition_key,
        delay_ms,
        ttl_ms,
        idempotency_key,
        _callbacks(payload),
    )


def _whole_ms(
    obj: dict[str, Any], key: str, low: int, high: int | None, high_key: str
) -> int | None:
    """An optional integer field of milliseconds in [low, high]; None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise Reject(400, f"field {key}: must be an integer number of milliseconds")
    if value < low:
        raise Reject(400, f"field {key}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise Reject(400, f"field {key}: must be <= {high} ({high_key}), got {value}")
    return value


def _check_idempotency_key(key: Any, where: str) -> None:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise Reject(400, f"{where}: must be a string of 1 to {MAX_KEY_LENGTH} characters")


def _idempotency_key(request: web.BaseRequest, call_request: CallRequest) -> str | None:
    """The `idempotency_key` field, or else the `Idempotency-Key` header; both must agree."""
    header = request.headers.get("Idempotency-Key")
    if header is None:
        return call_request.idempotency_key
    _check_idempotency_key(header, "header Idempotency-Key")
    if call_request.idempotency_key not in (None, header):
        raise Reject(400, "field idempotency_key: differs from the Idempotency-Key header")
    return header


def _string(obj: dict[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if value is None:
        raise Reject(400, f"field {path}: is missing")
    if not isinstance(value, str):
        raise Reject(400, f"field {path}: must be a string")
    return value


# Callers send to few destinations, and a batch's calls often to one: a parsed and checked
# URL is kept (yarl's URL is immutable). Refusals raise, so they are never kept.
@functools.lru_cache(maxsize=256)
def _parse_url(url: str, key: str = "url") -> URL:
    if len(url) > MAX_URL_LENGTH:
        raise Reject(400, f"field {key}: longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = URL(url)
    except ValueError:
        raise Reject(400, f"field {key}: not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise Reject(400, f"field {key}: must be an absolute http:// or https:// URL")
    if not _valid_host(parsed.raw_host or ""):
        raise Reject(400, f"field {key}: the host is not a valid host name or address")
    return parsed


def _callbacks(payload: dict[str, Any]) -> dict[str, str]:
    """The optional result callbacks, each an absolute http(s) URL."""
    found = {}
    for key in CALLBACK_FIELDS:
        value = payload.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise Reject(400, f"field {key}: must be a string when given")
        _parse_url(value, key)
        found[key] = value
    return found


def _valid_host(host: str) -> bool:
    """yarl takes almost any host; accept names (IDNA already applied) and IP addresses."""
    if HOST_NAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_destinations(entry: AclEntry, call_request: CallRequest) -> None:
    """The caller's `allow` and `denyPrivate` rules, for the url and each callback (the
    same rules: callbacks are calls)."""
    targets = [call_request.target, *map(URL, call_request.callbacks.values())]
    for target in targets:
        if (reason := refusal(entry.name, entry.allow, entry.deny_private, target)) is not None:
            raise Reject(403, reason)


class Ingest:
    """Turns an HTTP request into a durable Kafka record, or a clear refusal."""

    def __init__(self, node: ServedNode) -> None:
        self._node = node
        self._waiting = 0  # calls handed to Kafka and not yet acknowledged
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call is waiting for Kafka's acknowledgement."""
        await self._idle.wait()

    async def rpc_call(self, request: web.BaseRequest) -> web.Response:
        stats = self._node.stats
        stats.server.receivedCall += 1
        try:
            accepted = await self._accept(request)
        except Reject as exc:
            if self._node.config.compat_replies:
                return go_refusal(exc)
            return reply(exc.status, exc.errno, exc.msg)
        stats.server.acceptedCall += 1
        if self._node.config.compat_replies:
            return go_reply(OK, GO_ACCEPTED)
        return reply(200, OK, "success", accepted)

    async def rpc_calls(self, request: web.BaseRequest) -> web.Response:
        """`POST /rpc/calls`: a batch of calls under one ACL. Each call is checked, refused
        or written on its own, by the path a /rpc/call takes; all are written at once
        (librdkafka batches them), and the reply holds each one's outcome, in order."""
        started = time.perf_counter()
        config = self._node.config
        try:
            body = await _read_body(
                request, config.batch_body_limit, "http.server.batch.body.limit", config
            )
            if "Idempotency-Key" in request.headers:
                raise Reject(
                    400,
                    "header Idempotency-Key: a batch holds many calls; give each call its own"
                    " idempotency_key field instead",
                )
            name, secret, calls = parse_batch_request(body, config.batch_max_calls)
            entry = self._authenticate(name, secret)
        except Reject as exc:
            return reply(exc.status, exc.errno, exc.msg)
        self._node.stats.server.receivedCall += len(calls)
        batch = Batch(
            entry,
            secret,
            forwardable_headers(request.headers.items(), secret),
            started,
            # Only then can one call be over the limit a /rpc/call body has.
            check_size=len(body) > config.body_limit,
        )
        # Every call is checked and written (or, keyed, started) in batch order before any
        # is awaited: Kafka gets them all at once.
        pending: list[Awaitable[dict[str, Any]] | Reject] = []
        try:
            pending += (self._start(call, batch) for call in calls)
            replies = [await self._outcome(one) for one in pending]
        finally:
            self._release(batch.admitted)
            for one in pending:  # after a cancel or a bug, those never awaited are dropped
                if inspect.iscoroutine(one):
                    one.close()
        accepted = sum(1 for one in replies if one["errno"] == OK)
        return reply(200, OK, f"{accepted} of {len(calls)} calls accepted", replies)

    def _start(self, payload: Any, batch: Batch) -> Awaitable[dict[str, Any]] | Reject:
        """Check one call of a batch and, if the node takes it, write it now: its reply's
        data to await, or its refusal. The batch holds its place among the calls waiting
        for Kafka until the batch is answered."""
        config = self._node.config
        try:
            if not isinstance(payload, dict):
                raise Reject(400, "call must be a JSON object {url, data, ...}")
            if batch.check_size and len(orjson.dumps(payload)) > config.body_limit:
                raise Reject(
                    413,
                    f"call over the limit of {config.body_limit} bytes (http.server.body.limit)",
                )
            call_request = parse_call(payload, batch.entry.name, batch.secret, config.max_delay_ms)
            _check_destinations(batch.entry, call_request)
            self._admit()
        except Reject as exc:
            return exc
        batch.admitted += 1
        key = call_request.idempotency_key
        if key is None:  # no task: a coroutine awaited in turn costs a tenth of one
            call, placed = self._write(call_request, batch.entry, None, batch.headers)
            return self._stored(call, placed, batch.entry, batch.started)
        # A keyed call looks its key up first, so it runs as a task: after the batch's
        # earlier call with the same key, whom it then finds in the index as a retry would.
        earlier = batch.keyed.get(key)
        done = batch.keyed[key] = asyncio.Event()
        return asyncio.ensure_future(self._store_after(earlier, done, call_request, batch))

    async def _store_after(
        self,
        earlier: asyncio.Event | None,
        done: asyncio.Event,
        call_request: CallRequest,
        batch: Batch,
    ) -> dict[str, Any]:
        try:
            if earlier is not None:
                await earlier.wait()
            key = call_request.idempotency_key
            return await self._store(call_request, batch.entry, key, batch.headers, batch.started)
        finally:
            done.set()

    async def _outcome(self, call: Awaitable[dict[str, Any]] | Reject) -> dict[str, Any]:
        """One call's outcome in a batch's reply: the reply /rpc/call would give it, and
        that reply's HTTP status."""
        try:
            if isinstance(call, Reject):
                raise call
            data = await call
        except Reject as exc:
            return {"errno": exc.errno, "msg": exc.msg, "data": None, "status": exc.status}
        self._node.stats.server.acceptedCall += 1
        return {"errno": OK, "msg": "success", "data": data, "status": 200}

    def _authenticate(self, name: str, secret: str) -> AclEntry:
        entry = self._node.acl.authenticate(name, secret)
        if entry is None:
            raise Reject(403, "acl refused: unknown name or wrong secret")
        return entry

    async def _accept(self, request: web.BaseRequest) -> dict[str, Any]:
        """The reply's data for a call now in Kafka (or, for a repeated key, the first's)."""
        started = time.perf_counter()
        config = self._node.config
        body = await _read_body(request, config.body_limit, "http.server.body.limit", config)
        call_request = parse_call_request(body, config.max_delay_ms, config.compat_replies)
        entry = self._authenticate(call_request.name, call_request.secret)
        _check_destinations(entry, call_request)
        idempotency_key = _idempotency_key(request, call_request)
        headers = forwardable_headers(request.headers.items(), call_request.secret)
        self._admit()
        try:
            return await self._store(call_request, entry, idempotency_key, headers, started)
        finally:
            self._release(1)

    def _admit(self) -> None:
        """Take a place among the calls waiting for Kafka, or refuse the call: the node is
        not ready, or overloaded.

        Every check of the input comes before this: bad input is a 400 ("retrying
        cannot help") whatever the node's state, never a 503 "retry later". A keyed
        call waits from its index lookup on: it counts against channel.size and holds
        up a drain, as its write does."""
        node = self._node
        if not node.ready:
            raise Reject(503, node.not_ready_reason(), INTERNAL_ERROR)
        if self._waiting >= node.config.channel_size:
            node.stats.server.overloadCall += 1
            raise Reject(503, "overloaded: too many calls waiting for Kafka; retry later")
        if self._waiting == 0:
            self._idle.clear()
        self._waiting += 1

    def _release(self, places: int) -> None:
        self._waiting -= places
        if self._waiting == 0:
            self._idle.set()

    async def _store(
        self,
        call_request: CallRequest,
        entry: AclEntry,
        idempotency_key: str | None,
        headers: dict[str, str],
        started: float,
    ) -> dict[str, Any]:
        """Write the call (unless its key names an earlier one) and index its key."""
        if idempotency_key is not None:
            timeout = self._node.config.write_timeout_ms / 1000
            first = await self._node.index.first_at_ingest(entry.name, idempotency_key, timeout)
            if first is not None:
                return {"id": first.call_id, "duplicate": True}
        call, placed = self._write(call_request, entry, idempotency_key, headers)
        return await self._stored(call, placed, entry, started)

    def _write(
        self,
        call_request: CallRequest,
        entry: AclEntry,
        idempotency_key: str | None,
        headers: dict[str, str],
    ) -> tuple[Call, asyncio.Future[Placed]]:
        """Make the call and hand it to Kafka now; the future is Kafka's answer."""
        node = self._node
        call = new_call(
            call_request.url,
            call_request.data,
            call_request.name,
            headers,
            call_request.delay_ms,
            call_request.ttl_ms,
            idempotency_key=idempotency_key,
            callbacks=call_request.callbacks,
        )
        key = call_request.partition_key.encode() if call_request.partition_key else None
        timeout = node.config.write_timeout_ms / 1000
        return call, node.producer.write(entry.topic, encode_call(call), key, timeout=timeout)

    async def _stored(
        self, call: Call, placed: asyncio.Future[Placed], entry: AclEntry, started: float
    ) -> dict[str, Any]:
        """Once Kafka has the call, index its key: the reply's data."""
        node = self._node
        counters = node.stats.producer(entry.topic)
        try:
            partition, offset = await placed
            if call.idempotency_key is not None:
                timeout = node.config.write_timeout_ms / 1000
                await node.index.record(node.producer, call, entry.idempotency_window_ms, timeout)
        except ProduceFailed as exc:
            counters.deliveryFail += 1
            raise _produce_refusal(exc, entry.topic) from None
        finally:
            node.latencies.ingest_child(entry.topic).observe(time.perf_counter() - started)
        counters.deliverySuccess += 1
        if node.status_log is not None:
            node.status_log.queued(call, entry.topic)
        return {"id": call.id, "partition": partition, "offset": offset}


CALL_STATUS_PREFIX = "/rpc/call/"
CALL_ID = re.compile(r"[0-9a-f]{32}")


class CallStatus:
    """`GET /rpc/call/{id}`: a call's status from this node's view (bigpipe.calls.status_view),
    for its caller only, who signs in with HTTP Basic (ACL name and secret)."""

    def __init__(self, node: ServedNode) -> None:
        self._node = node

    async def get(self, request: web.BaseRequest) -> web.Response:
        view = self._node.status_view
        if view is None:
            return reply(404, CALLER_ERROR, "call status is off on this node (status.enabled)")
        caller = _basic_caller(request, self._node.acl)
        if isinstance(caller, web.Response):
            return caller
        call_id = request.path[len(CALL_STATUS_PREFIX) :]
        try:
            found = CALL_ID.fullmatch(call_id)
            status = await asyncio.to_thread(view.lookup, call_id, caller) if found else None
        except sqlite3.Error as exc:
            return reply(503, INTERNAL_ERROR, f"call status not available yet: {exc}; retry later")
        if status is None:
            return reply(
                404, CALLER_ERROR, f"no call {call_id!r} of yours (unknown, or past the retention)"
            )
        return reply(200, OK, "success", status)


BASIC_HINT = "HTTP Basic with your ACL name and secret (curl -u NAME:SECRET)"


def _basic_caller(request: web.BaseRequest, acl: Acl) -> str | web.Response:
    """The caller named and proven by HTTP Basic, or the 401 to answer."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return _unauthorized(f"authentication required: {BASIC_HINT}")
    try:
        name, colon, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        colon = ""
    if not colon:
        return _unauthorized(f"malformed Authorization header: use {BASIC_HINT}")
    entry = acl.authenticate(name, secret)
    if entry is None:
        return _unauthorized("acl refused: unknown name or wrong secret")
    return entry.name


def _unauthorized(msg: str) -> web.Response:
    response = reply(401, CALLER_ERROR, msg)
    response.headers["WWW-Authenticate"] = 'Basic realm="bigpipe", charset="UTF-8"'
    return response


def _produce_refusal(exc: ProduceFailed, topic: str) -> Reject:
    """Kafka's refusal as a reply that tells "retry later" from "retrying cannot help"."""
    if exc.too_large:
        return Reject(
            413,
            f"kafka refuses the call for good: {exc}; it is larger than topic {topic} "
            "accepts (its max.message.bytes), retrying cannot help",
        )
    if exc.permanent:
        return Reject(500, f"kafka refuses the call for good: {exc}; retrying cannot help")
    return Reject(503, f"kafka did not take the call: {exc}", INTERNAL_ERROR)


async def _read_body(request: web.BaseRequest, limit: int, limit_key: str, config: Config) -> bytes:
    """The body, at most `limit` bytes (the request factory set it, from `limit_key`)."""
    try:
        if request.content.is_eof():  # the whole body came with the headers: no wait
            return await request.read()
        async with asyncio.timeout(config.read_timeout_ms / 1000):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Reject(413, f"body over the limit of {limit} bytes ({limit_key})") from None
    except TimeoutError:
        raise Reject(
            408, "body not received within http.server.read.timeout", go=GO_UNREADABLE
        ) from None
    except web.RequestPayloadError as exc:
        raise Reject(400, f"body could not be read: {exc}", go=GO_UNREADABLE) from None


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Routes:
    """Path and method to handler: the few routes Bigpipe serves, in one dict lookup.

    aiohttp's low-level server calls `dispatch` directly. web.Application's router
    and middleware chain cost ~10% of an ingest call's CPU (py-spy), and Bigpipe
    needs neither: its paths are fixed and its one "middleware" is the try below.
    """

    def __init__(self) -> None:
        self._table: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, dict[str, Handler]]] = []  # asked only on a miss

    def add(self, method: str, path: str, handler: Handler) -> None:
        methods = self._table.setdefault(path, {})
        methods[method] = handler
        if method == "GET":
            methods["HEAD"] = handler  # aiohttp leaves the body out of a HEAD reply

    def add_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        """A route for every path under `prefix` (say, /rpc/call/{id})."""
        self._prefixes.append((prefix, {method: handler}))

    def _methods(self, path: str) -> dict[str, Handler] | None:
        methods = self._table.get(path)
        if methods is None:
            methods = next((m for p, m in self._prefixes if path.startswith(p)), None)
        return methods

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every reply keeps the {errno, msg, data} shape: 404, 405 and crashes too."""
        try:
            methods = self._methods(request.path)
            if methods is None:
                return reply(404, CALLER_ERROR, "not found")
            handler = methods.get(request.method) or methods.get("*")
            if handler is None:
                response = reply(405, CALLER_ERROR, "method not allowed")
                response.headers["Allow"] = ",".join(sorted(methods))
                return response
            if "Expect" in request.headers and (refusal := await _expect(request)) is not None:
                return refusal
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return reply(exc.status, CALLER_ERROR, exc.reason.lower())
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return reply(500, INTERNAL_ERROR, "internal error")
        finally:
            if request.transport is not None:
                request_done(request.transport)


async def _expect(request: web.BaseRequest) -> web.Response | None:
    """Answer `Expect: 100-continue` before the body is read; refuse any other expectation."""
    expectation = request.headers["Expect"]
    if request.version != HttpVersion11:
        return None
    if expectation.lower() != "100-continue":
        return reply(
            417, CALLER_ERROR, f"header Expect: only 100-continue is supported, not {expectation!r}"
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim reply is not part of the response's size
    return None


def build_server(
    node: ServedNode, extra_routes: list[tuple[str, str, Handler]], **http_settings: Any
) -> web.Server:
    """aiohttp's low-level server with Bigpipe's routes; `http_settings` go to its protocol."""
    routes = Routes()
    body_limit, batch_body_limit = node.config.body_limit, node.config.batch_body_limit
    loop = asyncio.get_running_loop()

    def make_request(message: Any, *parts: Any) -> web.BaseRequest:
        """Like aiohttp's default factory, but with Bigpipe's body limits."""
        limit = batch_body_limit if message.url.path == BATCH_PATH else body_limit
        return web.BaseRequest(message, *parts, loop=loop, client_max_size=limit)

    async def stats(_request: web.BaseRequest) -> web.Response:
        return reply(200, OK, "success", node.view()[0].snapshot(node.config))

    async def mock(_request: web.BaseRequest) -> web.Response:
        return web.Response(status=200)

    async def metrics(_request: web.BaseRequest) -> web.Response:
        stats, latencies, ready = node.view()
        body = render(node.config, stats, ready, latencies)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def openapi(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=OPENAPI_JSON, content_type="application/json")

    async def dashboard(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=DASHBOARD_HTML, content_type="text/html", charset="utf-8")

    async def healthz(_request: web.BaseRequest) -> web.Response:
        return reply(200, OK, "alive")

    async def readyz(_request: web.BaseRequest) -> web.Response:
        if not node.ready:
            return reply(503, INTERNAL_ERROR, node.not_ready_reason())
        if not node.node_ready():
            return reply(503, INTERNAL_ERROR, "another worker of this node is not ready yet")
        return reply(200, OK, "ready")

    # The original took /rpc/call with any method (a GET has no JSON body: "JSON无效").
    routes.add("*" if node.config.compat_replies else "POST", "/rpc/call", node.ingest.rpc_call)
    routes.add("POST", BATCH_PATH, node.ingest.rpc_calls)
    routes.add("GET", "/stats", stats)
    routes.add("*", "/rpc/server/mock", mock)
    routes.add("GET", "/healthz", healthz)
    routes.add("GET", "/dashboard", dashboard)
    routes.add("GET", "/metrics", metrics)
    routes.add("GET", "/openapi.json", openapi)
    routes.add("GET", "/readyz", readyz)
    routes.add_prefix("GET", CALL_STATUS_PREFIX, CallStatus(node).get)
    for method, path, handler in extra_routes:  # the admin endpoints, when the node has them
        routes.add(method, path, handler)
    return web.Server(routes.dispatch, request_factory=make_request, **http_settings)
