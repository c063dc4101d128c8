"""Shared parts of the fault tests: a downstream that can go down, a load generator, and
the accounting of every accepted call (delivered, dead-lettered, or lost).

lost = calls answered errno 0 that reached neither the downstream (with a 2xx) nor
the dead-letter topic. Every fault test asserts it is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    base_config,
    consumer_entry,
    free_port,
    read_topic,
    topic_record_count,
    unique,
)

CONN_ERROR = ("conn", None)  # the node refused or dropped the connection (e.g. killed)
CLIENT_TIMEOUT = ("timeout", None)  # no answer within the client's own deadline


# ---------------------------------------------------------------- config
def fault_config(
    bootstrap: str,
    *,
    partitions: int = 6,
    port: int | None = None,
    group: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], str]:
    """A Bigpipe config on a fresh topic with replicationFactor 3 / minInsyncReplicas 2."""
    topic = unique("faults")
    entry = consumer_entry(topic, unique("g"), **(group or {}))
    config = base_config(
        bootstrap,
        topic,
        port or free_port(),
        partitions=partitions,
        consumers=[entry],
        **overrides,
    )
    config["kafka.topics"] = [
        {"name": topic, "partitions": partitions, "replicationFactor": 3, "minInsyncReplicas": 2}
    ]
    return config, topic


def dead_letter_topic(config: dict[str, Any]) -> str:
    entry = config["kafka.consumer.list"][0]
    return entry.get("deadLetterTopic", f"{entry['topic']}.{entry['groupId']}.dlq")


# ---------------------------------------------------------------- downstream
@dataclass
class Sink:
    """A downstream on a fixed loopback port that can answer 503 or go away entirely.

    `ok` counts the 2xx answers per call id: a call is delivered once it has one.
    """

    port: int = 0
    failing: bool = False  # answer 503 instead of 200
    ok: Counter[str] = field(default_factory=Counter)
    first_ok_at: dict[str, float] = field(default_factory=dict)  # call id -> monotonic time
    refused_attempts: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> Sink:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = self.port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        """Close the port: deliveries now get 'connection refused'."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> set[str]:
        return set(self.ok)

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.failing:
            self.refused_attempts += 1
            return web.Response(status=503, text="down for the fault test")
        call_id = request.headers.get("X-Bigpipe-Call-Id", "")
        self.ok[call_id] += 1
        self.first_ok_at.setdefault(call_id, time.monotonic())
        return web.Response(status=200, text="ok")


# ---------------------------------------------------------------- load
@dataclass
class Tally:
    """What the callers saw."""

    sent: int = 0
    accepted: set[str] = field(default_factory=set)
    outcomes: Counter[tuple[Any, Any]] = field(default_factory=Counter)
    accept_latency: list[float] = field(default_factory=list)
    refusal_latency: list[float] = field(default_factory=list)
    # (monotonic time, outcome) of each answer, to tell what happened during a fault
    timeline: list[tuple[float, tuple[Any, Any]]] = field(default_factory=list)

    def record(self, outcome: tuple[Any, Any], call_id: str | None, took: float) -> None:
        """One answer: `outcome` is (HTTP status, errno), `took` its latency in s."""
        self.sent += 1
        self.outcomes[outcome] += 1
        self.timeline.append((time.monotonic(), outcome))
        if outcome == (200, 0):
            assert call_id is not None
            self.accepted.add(call_id)
            self.accept_latency.append(took)
        elif outcome[0] == 503:
            self.refusal_latency.append(took)

    def outcomes_between(self, start: float, end: float) -> Counter[tuple[Any, Any]]:
        return Counter(outcome for at, outcome in self.timeline if start <= at < end)


class Load:
    """Senders posting /rpc/call over keep-alive connections.

    Closed loop (the default): `senders` tasks, each posting its next call once the
    last is answered, `pause` s later. Open loop (`rate` given): one call every
    1/rate s whatever the answers, at most `senders` in flight; a call that would
    exceed that is counted in `skipped` (the client, not Bigpipe, is saturated).
    Call i goes to targets()[i % len(targets())]; `targets` is a callable so a test
    can swap a restarted node in, or drop a dead one.
    """

    def __init__(
        self,
        targets: Callable[[], Sequence[Bigpipe]],
        sink: Sink,
        senders: int = 4,
        pause: float = 0.01,
        tag: str = "call",
        rate: float | None = None,
        request_timeout: float = 15.0,
    ) -> None:
        self.targets = targets
        self.sink = sink
        self.senders = senders
        self.pause = pause
        self.rate = rate
        self.tag = tag
        self.tally = Tally()
        self.skipped = 0
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._numbers = itertools.count()
        self._running = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._running = True
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout
        )
        if self.rate is None:
            self._tasks = {asyncio.create_task(self._sender(i)) for i in range(self.senders)}
        else:
            self._tasks = {asyncio.create_task(self._dispatch(self.rate))}

    async def stop(self) -> None:
        self._running = False
        while self._tasks:
            await asyncio.gather(*list(self._tasks))
            self._tasks = {t for t in self._tasks if not t.done()}
        if self._session is not None:
            await self._session.close()

    async def _sender(self, index: int) -> None:
        while self._running:
            outcome = await self._one(index)
            if outcome in (CONN_ERROR, CLIENT_TIMEOUT):
                await asyncio.sleep(0.05)  # a node that is down: do not spin
            elif self.pause:
                await asyncio.sleep(self.pause)

    async def _dispatch(self, rate: float) -> None:
        began, issued = time.monotonic(), 0
        in_flight: set[asyncio.Task[tuple[Any, Any]]] = set()
        while self._running:
            due = int((time.monotonic() - began) * rate) - issued
            for _ in range(due):
                issued += 1
                if len(in_flight) >= self.senders:
                    self.skipped += 1
                    continue
                task = asyncio.create_task(self._one(issued))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.sleep(0.005)
        await asyncio.gather(*list(in_flight))

    async def _one(self, index: int) -> tuple[Any, Any]:
        targets = self.targets()
        node = targets[index % len(targets)]
        number = next(self._numbers)
        body = orjson.dumps(
            {
                "acl": {"name": ACL_NAME, "secret": ACL_SECRET},
                "url": self.sink.url(),
                "data": f"{self.tag}-{number}",
                "partition_key": str(number),
            }
        )
        outcome, call_id, took = await self._post(node, body)
        self.tally.record(outcome, call_id, took)
        return outcome

    async def _post(self, node: Bigpipe, body: bytes) -> tuple[tuple[Any, Any], str | None, float]:
        assert self._session is not None
        started = time.perf_counter()
        try:
            async with self._session.post(f"{node.url}/rpc/call", data=body) as response:
                reply = await response.json(content_type=None)
                took = time.perf_counter() - started
                call_id = (reply.get("data") or {}).get("id") if reply["errno"] == 0 else None
                return (response.status, reply["errno"]), call_id, took
        except (aiohttp.ClientError, OSError, ValueError):
            return CONN_ERROR, None, time.perf_counter() - started
        except TimeoutError:
            return CLIENT_TIMEOUT, None, time.perf_counter() - started


# ---------------------------------------------------------------- accounting
@dataclass
class Accounting:
    name: str
    sent: int
    accepted: int
    delivered: int
    dead_lettered: int
    lost: int
    duplicated: int
    lost_ids: list[str]
    excused: int = 0  # see settle_and_account

    def line(self) -> str:
        excused = f" excused={self.excused}" if self.excused else ""
        return (
            f"[fault] {self.name}: sent={self.sent} accepted={self.accepted} "
            f"delivered={self.delivered} dead-lettered={self.dead_lettered}{excused} "
            f"lost={self.lost} duplicated={self.duplicated}"
            + (f" lost ids (first 10): {' '.join(self.lost_ids)}" if self.lost else "")
        )


def dead_letter_reasons(bootstrap: str, topic: str) -> dict[str, str]:
    """Call id -> `reason` of each call in a dead-letter topic (blocking: run it in a
    thread)."""
    count = topic_record_count(bootstrap, topic)
    reasons = {}
    for message in read_topic(bootstrap, topic, count, timeout=30) if count else []:
        record = orjson.loads(message.value())
        if record.get("call"):
            reasons[record["call"]["id"]] = record["reason"]
    return reasons


def _dead_letter_ids(bootstrap: str, topic: str) -> set[str]:
    return set(dead_letter_reasons(bootstrap, topic))


class Deliveries(Protocol):
    """What reached the downstreams: a Sink, or several (the soak's Mix)."""

    @property
    def ok(self) -> Counter[str]: ...

    def delivered(self) -> set[str]: ...


async def settle_and_account(
    name: str,
    tally: Tally,
    sink: Deliveries,
    bootstrap: str,
    dlq_topic: str,
    timeout: float,
    excused: Callable[[], set[str]] = set,
) -> Accounting:
    """Wait (bounded) until every accepted call is delivered or dead-lettered; count.

    `excused` gives accepted calls that are owed no delivery: copies of one idempotency
    key answered as two calls, of which Bigpipe delivers only one (the soak's).
    The dead-letter topic is only read when the downstream alone does not account for
    every call, and then at most every few seconds (it takes a Kafka consumer).
    """
    deadline = time.monotonic() + timeout
    dead: set[str] = set()
    dead_seen = -1
    next_dlq_check = 0.0
    while True:
        missing = tally.accepted - sink.delivered() - dead - excused()
        now = time.monotonic()
        if not missing or now > deadline:
            break
        if now >= next_dlq_check:
            count = await asyncio.to_thread(_record_count_or_zero, bootstrap, dlq_topic)
            if count != dead_seen:
                dead = await asyncio.to_thread(_dead_letter_ids, bootstrap, dlq_topic)
                dead_seen = count
            next_dlq_check = now + 3
        await asyncio.sleep(0.2)
    # One last full read, so the dead-lettered figure is exact.
    if await asyncio.to_thread(_record_count_or_zero, bootstrap, dlq_topic):
        dead = await asyncio.to_thread(_dead_letter_ids, bootstrap, dlq_topic)
    delivered = tally.accepted & sink.delivered()
    dead_lettered = (tally.accepted & dead) - delivered
    skipped = (tally.accepted - delivered - dead) & excused()
    lost = tally.accepted - delivered - dead - skipped
    ok = sink.ok
    duplicated = sum(1 for call_id in delivered if ok[call_id] > 1)
    accounting = Accounting(
        name,
        tally.sent,
        len(tally.accepted),
        len(delivered),
        len(dead_lettered),
        len(lost),
        duplicated,
        sorted(lost)[:10],
        len(skipped),
    )
    print(f"\n{accounting.line()}", flush=True)
    return accounting


def _record_count_or_zero(bootstrap: str, topic: str) -> int:
    # The dead-letter topic exists once Bigpipe is ready; a probe that fails counts 0.
    with contextlib.suppress(Exception):
        return topic_record_count(bootstrap, topic)
    return 0


# ---------------------------------------------------------------- probes
async def readyz_status(node: Bigpipe, http: aiohttp.ClientSession) -> int | None:
    try:
        async with http.get(f"{node.url}/readyz") as response:
            return response.status
    except aiohttp.ClientError:
        return None


def assignments(node: Bigpipe) -> int:
    """How many times the node was assigned partitions (an empty assignment does not count)."""
    return len(re.findall(r"assigned partitions \[\d", node.log_tail(100_000)))


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def outcome_summary(outcomes: Counter[tuple[Any, Any]]) -> str:
    return " ".join(f"{status}/{errno}:{count}" for (status, errno), count in outcomes.items())
