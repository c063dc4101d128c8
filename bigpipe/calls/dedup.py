"""Idempotency keys: one delivery per (caller, key) within the caller's window.

The index is a Kafka topic, `bigpipe.idempotency` (one partition, time-based
retention), with one record per keyed call accepted: key `[caller, key]`,
value `{"id", "ts", "w"}` (call id, acceptance time and window, in ms). Every
worker of every node reads the whole topic into a dict. Reading one partition
in one order, they all agree on the *first* call of each (caller, key) within
its window, which is what both ingest and delivery ask:

- ingest answers a keyed call whose first call is known with that call's id
  (`duplicate: true`) and writes nothing;
- delivery delivers a keyed call only if it is the first: a copy that raced
  past ingest on another node is skipped.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from bigpipe.calls.envelope import Call
from bigpipe.calls.topics import INDEX_TOPIC
from bigpipe.config import Config
from bigpipe.ingest.producer import ProduceFailed, Producer
from bigpipe.kafka import CATCH_UP_DEFAULTS, client_settings

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
POLL_SECONDS = 0.2  # how long the view's thread blocks when nothing comes
BATCH = 500  # records handed to the event loop at once, at most
WATERMARK_TIMEOUT = 5.0


def index_reader_settings(config: Config) -> dict[str, Any]:
    return {
        **client_settings(config, CATCH_UP_DEFAULTS),
        "group.id": "bigpipe-idempotency-view",  # assigned, never joined or committed
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    }


@dataclass(slots=True)
class First:
    """The first call of a (caller, key) in its window."""

    call_id: str
    accepted_ms: int
    window_ms: int

    def covers(self, at_ms: int) -> bool:
        return abs(at_ms - self.accepted_ms) < self.window_ms


class IdempotencyIndex:
    """This process's view of the index topic, fed by a polling thread."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._firsts: dict[tuple[str, str], First] = {}
        self._position = 0  # the next offset the view will apply
        # (window end, key) of each first stored, soonest first: what eviction looks at
        self._expiries: list[tuple[int, tuple[str, str]]] = []
        self._advanced = asyncio.Event()
        self._stopping = threading.Event()
        self._kafka: Consumer | None = None
        self._ends: Consumer | None = None
        self._poller: threading.Thread | None = None

    def start(self) -> None:
        """Read the index from its beginning; again: no-op.

        Started at the first keyed call a process sees (the topic exists by then), not
        with the node: a node whose callers send no keys runs no extra Kafka clients.
        """
        if self._kafka is not None:
            return
        settings = index_reader_settings(self._config)
        self._kafka = Consumer(settings)
        # A handle of its own for asking where the topic ends: one handle used from two
        # threads at once (the poll thread and a watermark query) deadlocked.
        self._ends = Consumer(settings)
        self._kafka.assign([TopicPartition(INDEX_TOPIC, 0, OFFSET_BEGINNING)])
        self._poller = threading.Thread(target=self._poll_forever, name="idem-view", daemon=True)
        self._poller.start()

    async def close(self) -> None:
        self._stopping.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, POLL_SECONDS * 5)
        for handle in (self._kafka, self._ends):
            if handle is not None:
                await asyncio.to_thread(handle.close)

    # ------------------------------------------------------------ questions
    async def first_at_ingest(self, caller: str, key: str, timeout: float) -> First | None:
        """The first call for the key now, reading up to Kafka's end on a miss.

        A call answered anywhere had its index record acknowledged before its answer,
        so catching up to the end now sees every earlier call's record.
        """
        self.start()
        now = int(time.time() * 1000)
        if (first := self._lookup(caller, key, now)) is not None:
            return first
        await self._catch_up(timeout)
        return self._lookup(caller, key, now)

    async def is_first(self, call: Call, timeout: float) -> bool:
        """Should this keyed call be delivered? Only the first of its key's window is.

        Its own index record is written within `timeout` of its acceptance. Until the
        view holds a first for the key, wait out what is left of that time; if none
        comes, its record was never stored (its caller was told so): deliver it, since a
        duplicate beats a lost call. A call older than that (a backlog, a redrive past
        its window) costs one catch-up, no wait.
        """
        self.start()
        first = self._lookup_call(call)
        if first is None:
            await self._catch_up(timeout)
            left = call.created_ms / 1000 + timeout - time.time()
            await self._wait_until(lambda: self._lookup_call(call) is not None, left)
            first = self._lookup_call(call)
        return first is None or first.call_id == call.id

    def _lookup_call(self, call: Call) -> First | None:
        assert call.idempotency_key is not None
        return self._lookup(call.caller, call.idempotency_key, call.created_ms)

    async def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Wait for the view to advance until `done()`, or `timeout` s pass."""
        deadline = self._loop.time() + timeout
        while not done() and (left := deadline - self._loop.time()) > 0:
            self._advanced.clear()
            try:
                await asyncio.wait_for(self._advanced.wait(), left)
            except TimeoutError:
                return

    def _lookup(self, caller: str, key: str, at_ms: int) -> First | None:
        first = self._firsts.get((caller, key))
        return first if first is not None and first.covers(at_ms) else None

    async def _catch_up(self, timeout: float) -> None:
        """Wait until the view has applied every record stored now (or `timeout` passes)."""
        assert self._ends is not None
        try:
            low, high = await asyncio.to_thread(
                self._ends.get_watermark_offsets,
                TopicPartition(INDEX_TOPIC, 0),
                min(timeout, WATERMARK_TIMEOUT),
                False,
            )
        except KafkaException as exc:
            log.warning("idempotency index: cannot read its end: %s", exc.args[0].str())
            return
        # Records before the topic's start are gone (retention): nothing to apply there.
        # Else an index emptied by retention never reaches its end: a full timeout a call.
        self._position = max(self._position, low)
        await self._wait_until(lambda: self._position >= high, timeout)

    # ------------------------------------------------------------ writing
    async def record(self, producer: Producer, call: Call, window_ms: int, timeout: float) -> None:
        """Index a keyed call once it is stored (so the index never names a call that is
        not) and before it is answered (so every node sees it by the time a retry comes).

        If Kafka does not take the record, the call stays accepted (it is stored): it is
        delivered after delivery's wait for its record, and a retry of its key is new.
        """
        assert call.idempotency_key is not None
        key = orjson.dumps([call.caller, call.idempotency_key])
        value = orjson.dumps({"id": call.id, "ts": call.created_ms, "w": window_ms})
        try:
            await producer.send(INDEX_TOPIC, value, key, timeout=timeout)
        except ProduceFailed as exc:
            log.warning("idempotency index: call %s not indexed: %s", call.id, exc)

    # ------------------------------------------------------------ reading
    def _poll_forever(self) -> None:
        """poll() wakes at the first record; consume(..., 0) then takes what else has come.
        (consume(500, 0.2) waited out its 200 ms unless 500 records came, and every keyed
        call waits for the view to catch up: ~200 ms each.)"""
        assert self._kafka is not None
        while not self._stopping.is_set():
            try:
                first = self._kafka.poll(POLL_SECONDS)
                messages = [] if first is None else [first, *self._kafka.consume(BATCH - 1, 0)]
            except KafkaException as exc:
                log.warning("idempotency index: %s", exc.args[0].str())
                continue
            batch = [m for m in messages if m.error() is None]
            if batch:
                self._loop.call_soon_threadsafe(self._apply, batch)

    def _apply(self, batch: list[Message]) -> None:
        for message in batch:
            self._apply_one(message.key(), message.value())
            self._position = message.offset() + 1
        self._evict(int(time.time() * 1000))
        self._advanced.set()

    def _apply_one(self, raw_key: bytes | None, raw_value: bytes | None) -> None:
        try:
            caller, key = orjson.loads(raw_key or b"")
            value: dict[str, Any] = orjson.loads(raw_value or b"")
            first = First(value["id"], value["ts"], value["w"])
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError):
            return  # not ours: nothing to dedup against
        held = self._firsts.get((caller, key))
        if held is None or not held.covers(first.accepted_ms):
            self._firsts[(caller, key)] = first
            heapq.heappush(self._expiries, (first.accepted_ms + first.window_ms, (caller, key)))

    def _evict(self, now_ms: int) -> None:
        """Forget keys whose window has passed: memory holds only live windows. A heap of
        window ends, so each batch looks only at what has expired (a scan of every key
        cost O(keys) a sweep)."""
        expiries = self._expiries
        while expiries and expiries[0][0] <= now_ms:
            _, key = heapq.heappop(expiries)
            first = self._firsts.get(key)
            # A key given a newer first since has its own, later, entry: keep it.
            if first is not None and now_ms - first.accepted_ms >= first.window_ms:
                del self._firsts[key]
