"""A call you can follow: every step of its life, written to the results topic.

Each record is keyed by the call id and says one thing that happened, as JSON:

- `queued`: accepted at ingest (`topic`, the `groups` that will deliver it, `due`);
- `in_flight`: an attempt's request is open (`group`, `attempt`), written only once it has
  been open for a tick (50-100 ms): most attempts end sooner and write only their end;
- `attempt`: how it ended (`status` or `error`, `latency_ms`, `retry_after`, and `next`,
  the due time of the retry when one follows); a 2xx is the call delivered;
- `dead`: written to the dead-letter topic (`reason` failed or expired, `error`,
  `deadLetter`).

Every record has `caller` (only the caller may look the call up) and `at` (Unix ms).
Writes are fire-and-forget through a producer of their own, which batches them
(linger.ms 50, lz4): a step that Kafka does not take is counted in `statusDropped` and
never slows or fails the call. bigpipe.calls.status_view folds them into a call's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KafkaProducer

from bigpipe.calls.envelope import Call
from bigpipe.config import Config
from bigpipe.kafka import client_settings
from bigpipe.kafka_client import RepeatFilter
from bigpipe.stats import StatusCounters

if TYPE_CHECKING:
    from bigpipe.delivery.client import AttemptResult

log = logging.getLogger(__name__)

# How often failed writes are counted and deferred in_flight steps go out: an attempt
# that ends sooner (most do) writes no in_flight step at all, only its `attempt`. Nobody
# could have seen it in flight anyway: the producer's linger and the views lag as long.
TICK_SECONDS = 0.05
QUEUED, IN_FLIGHT, ATTEMPT, DEAD = "queued", "in_flight", "attempt", "dead"


def _now_ms() -> int:
    return int(time.time() * 1000)


class StatusLog:
    """This process's writer of the results topic (one per process, shared by its groups)."""

    def __init__(self, config: Config, counters: StatusCounters) -> None:
        self._topic = config.status_topic
        self._counters = counters
        self._repeats = RepeatFilter()
        self._groups = _groups_by_topic(config)
        self._kafka = self._new_producer(config)
        self._retiring: set[asyncio.Task[None]] = set()  # producers replaced by a reload
        # in_flight steps not written yet, by (call id, group, attempt): those of the last
        # tick, and of this one. Each tick writes the older ones: open for a tick or more.
        self._older: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._newer: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._ticker = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def _new_producer(self, config: Config) -> KafkaProducer:
        return KafkaProducer(
            {
                **status_producer_settings(config),
                "error_cb": self._on_error,
                "on_delivery": self._on_delivery,
            }
        )

    def update(self, config: Config) -> None:
        """A reload: the groups a topic's calls go to may have changed."""
        self._groups = _groups_by_topic(config)

    def renew(self, config: Config) -> None:
        """New client settings (rotated credentials, say): a new producer. The old one
        flushes in the background: a call with steps in both may have them land out of
        order, and status_of orders a call's steps by their time, not by their arrival."""
        old, self._kafka = self._kafka, self._new_producer(config)
        flushing = asyncio.create_task(self._flush(old, config.shutdown_timeout_ms / 1000))
        self._retiring.add(flushing)
        flushing.add_done_callback(self._retiring.discard)

    def group(self, group_id: str) -> GroupTrail:
        return GroupTrail(self, group_id)

    def queued(self, call: Call, topic: str) -> None:
        record = {"e": QUEUED, "caller": call.caller, "at": call.created_ms, "topic": topic}
        record["groups"] = self._groups.get(topic, ())
        if call.due_ms:
            record["due"] = call.due_ms
        self.write(call.id, record)

    def write(self, call_id: str, record: dict[str, Any]) -> None:
        """Hand one record to the producer; never waits, never raises."""
        try:
            self._kafka.produce(self._topic, orjson.dumps(record), call_id.encode())
        except (BufferError, KafkaException):  # a full queue, a refusal: the call goes on
            self._counters.statusDropped += 1

    def defer(self, key: tuple[str, str, int], record: dict[str, Any]) -> None:
        """An in_flight step, written only if its attempt is still open a tick from now."""
        self._newer[key] = record

    def undefer(self, key: tuple[str, str, int]) -> None:
        """The attempt ended: its in_flight step, if not written yet, never will be."""
        if self._newer.pop(key, None) is None:
            self._older.pop(key, None)

    async def close(self, timeout: float) -> None:
        self._ticker.cancel()
        await asyncio.gather(self._flush(self._kafka, timeout), *self._retiring)

    async def _flush(self, producer: KafkaProducer, timeout: float) -> None:
        left = await asyncio.to_thread(producer.flush, timeout)
        self._counters.statusDropped += left

    def _tick(self) -> None:
        for (call_id, _, _), record in self._older.items():
            self.write(call_id, record)
        self._older, self._newer = self._newer, {}
        self._kafka.poll(0)  # serves the error reports below
        self._ticker = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:  # only errors are reported (delivery.report.only.error)
            self._counters.statusDropped += 1

    def _on_error(self, error: KafkaError) -> None:
        if (text := self._repeats(error)) is not None:
            log.warning("status producer: %s", text)


def status_producer_settings(config: Config) -> dict[str, Any]:
    defaults = {
        "linger.ms": 50,  # nobody waits for these: batch them
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
    }
    return {
        **client_settings(config, defaults),
        "client.id": "bigpipe-status",
        # Ordered per call (one key, one partition, no reordering on retry).
        "enable.idempotence": True,
        "delivery.report.only.error": True,
    }


class GroupTrail:
    """The steps one consumer group writes for a call: attempts and dead letters."""

    def __init__(self, log: StatusLog | None, group_id: str) -> None:
        self._log = log
        self._group_id = group_id

    def attempt_started(self, call: Call, attempt: int) -> None:
        if self._log is not None:
            record = {"e": IN_FLIGHT, "caller": call.caller, "at": _now_ms()}
            record.update(group=self._group_id, attempt=attempt)
            self._log.defer((call.id, self._group_id, attempt), record)

    def attempt_ended(
        self, call: Call, attempt: int, result: AttemptResult, next_ms: int | None
    ) -> None:
        """An attempt's end; `next_ms`: when the retry that follows it is due."""
        if self._log is None:
            return
        self._log.undefer((call.id, self._group_id, attempt))
        record = {"e": ATTEMPT, "caller": call.caller, "at": _now_ms(), "group": self._group_id}
        record.update(attempt=attempt, status=result.status)
        record["latency_ms"] = round(result.latency_s * 1000, 1)
        if result.error:
            record["error"] = result.error
        if result.retry_after is not None:
            record["retry_after"] = result.retry_after
        if next_ms is not None:
            record["next"] = next_ms
        self._log.write(call.id, record)

    def dead(
        self, call: Call, reason: str, error: str, topic: str, placed: tuple[int, int] | None
    ) -> None:
        """Written to the dead-letter topic `topic` at `placed` (None: skipped, not written),
        for `reason` (failed, expired) with the dead letter's `error` (its lastError)."""
        if self._log is None:
            return
        where = {"topic": topic}
        if placed is not None:
            where.update(partition=placed[0], offset=placed[1])
        record = {"e": DEAD, "caller": call.caller, "at": _now_ms(), "group": self._group_id}
        record.update(reason=reason, error=error, deadLetter=where)
        self._log.write(call.id, record)


NO_TRAIL = GroupTrail(None, "")  # tracking off: every step is a no-op


def _groups_by_topic(config: Config) -> dict[str, tuple[str, ...]]:
    groups: dict[str, list[str]] = {}
    for consumer in config.consumers:
        groups.setdefault(consumer.topic, []).append(consumer.group_id)
    return {topic: tuple(ids) for topic, ids in groups.items()}


# ---------------------------------------------------------------- folding
def status_of(call_id: str, records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """A call's status from its records, in any order; None when there are none.

    The `queued` record (from the accepting node) only sets where each group starts:
    steps of a group come from the node delivering it, whose clock may differ, so they
    are ordered among themselves by time, and the last one gives the group's state.
    """
    queued: dict[str, Any] | None = None
    steps: dict[str, list[dict[str, Any]]] = {}
    first_ms = None
    for record in records:
        first_ms = record["at"] if first_ms is None else min(first_ms, record["at"])
        if record["e"] == QUEUED:
            queued = record
        else:
            steps.setdefault(record["group"], []).append(record)
    if first_ms is None:
        return None
    groups = {group: _start(queued) for group in (queued or {}).get("groups", ())}
    for group, records in steps.items():
        records.sort(key=lambda r: (r["at"], _RANK[r["e"]]))
        groups[group] = _group_status(groups.get(group) or _start(None), records)
    return {
        "id": call_id,
        # A call not accepted at ingest (a result callback, a redriven call): its first step.
        "accepted": queued["at"] if queued else first_ms,
        "topic": queued["topic"] if queued else None,
        "due": (queued or {}).get("due"),
        "groups": groups,
    }


_RANK = {IN_FLIGHT: 0, ATTEMPT: 1, DEAD: 2}


def _start(queued: dict[str, Any] | None) -> dict[str, Any]:
    due = (queued or {}).get("due")
    return {
        "state": "waiting" if due else "queued",
        "due": due,
        "attempts": [],
        "outcome": None,
    }


def _group_status(group: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    for record in records:
        kind = record["e"]
        if kind == IN_FLIGHT:
            group.update(state="in_flight", due=None)
        elif kind == ATTEMPT:
            group["attempts"].append(_attempt(record))
            status = record.get("status")
            if status is not None and 200 <= status < 300:
                group.update(state="delivered", due=None)
                group["outcome"] = {"result": "delivered", "at": record["at"], "status": status}
            elif (due := record.get("next")) is not None:
                group.update(state="waiting", due=due)
        else:  # DEAD
            result = "expired" if record.get("reason") == "expired" else "dead"
            group.update(state=result, due=None)
            group["outcome"] = {
                "result": result,
                "at": record["at"],
                "status": group["attempts"][-1]["status"] if group["attempts"] else None,
                "error": record.get("error"),
                "deadLetter": record.get("deadLetter"),
            }
    return group


def _attempt(record: dict[str, Any]) -> dict[str, Any]:
    """An attempt as the reply shows it; its record's `at` is its end, `at` here its start."""
    latency = record.get("latency_ms") or 0
    return {
        "attempt": record.get("attempt"),
        "at": record["at"] - round(latency),
        "status": record.get("status"),
        "error": record.get("error"),
        "latency_ms": record.get("latency_ms"),
        "retry_after": record.get("retry_after"),
    }
