"""Result callbacks: after a call is delivered or dead-lettered, tell the caller.

A callback is a call itself: written to the group's own call topic, for this
group only (`group`, as a redriven call), by the caller, to the callback URL,
with a JSON body. It so has every guarantee and shield a call has: at least
once, retries, breakers, the caller's `allow`/`denyPrivate` and signing, and
a dead letter if it fails. It carries no callbacks of its own, and its failure
never touches the call it reports on.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Mapping

import orjson

from bigpipe.calls.envelope import Call, encode_call, new_call
from bigpipe.delivery.client import RESPONSE_READ_LIMIT, Outcome
from bigpipe.ingest.producer import ProduceFailed, Producer, write_until_stored

log = logging.getLogger(__name__)

CALLBACK_FIELDS = ("callback", "failure_callback")
CALLBACK_BACKOFF_MS = (500, 10_000)  # between tries of a write Kafka did not take


def callback_body(
    call: Call, group_id: str, outcome: Outcome, dead_letter_topic: str | None
) -> bytes:
    """The JSON a callback URL receives (the README documents every field)."""
    last = outcome.last
    body = last.body[:RESPONSE_READ_LIMIT]
    latency = None
    if outcome.first_attempt_ms is not None:
        latency = int(time.time() * 1000) - outcome.first_attempt_ms
    report = {
        "id": call.id,
        "group": group_id,
        "status": last.status,
        "headers": _headers(last.headers),
        "body": base64.b64encode(body).decode(),
        "bodyCut": len(last.body) > RESPONSE_READ_LIMIT,
        "attempts": outcome.attempts,
        "latency_ms": latency,
    }
    if not outcome.delivered:
        report["error"] = last.error
        report["deadLetter"] = {"topic": dead_letter_topic}
    return orjson.dumps(report)


def _headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The reply's headers by name; a repeated one joined with ", " (RFC 9110)."""
    joined: dict[str, str] = {}
    for name, value in (headers or {}).items():
        name = str(name)  # aiohttp's names are istr, which orjson does not take
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


async def send_callback(
    producer: Callable[[], Producer],
    topic: str,
    group_id: str,
    call: Call,
    outcome: Outcome,
    dead_letter_topic: str | None,
) -> None:
    """Write the call's callback, if it asked for one, through the producer in place
    (`producer()`, which a reload replaces); return once Kafka has it.

    Written before the call's offset is committed: a crash before then delivers the
    call again (at least once), and then writes the callback.
    """
    url = (call.callbacks or {}).get("callback" if outcome.delivered else "failure_callback")
    if url is None:
        return
    data = callback_body(call, group_id, outcome, dead_letter_topic).decode()
    report = new_call(url, data, call.caller, {"Content-Type": "application/json"})
    report.group = group_id  # this group delivers it; the topic's other groups skip it
    try:
        await write_until_stored(
            producer, topic, encode_call(report), call.id.encode(), CALLBACK_BACKOFF_MS
        )
    except ProduceFailed as refusal:
        log.error("callback of call %s refused for good by Kafka: %s", call.id, refusal)
