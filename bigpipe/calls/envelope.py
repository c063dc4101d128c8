"""The Kafka record formats: a call envelope, and the dead letter that wraps one.

Both are small, versioned JSON objects so that kcat, or any other tool,
can read a topic without Bigpipe. The README documents every field.
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

# Version 2 adds the optional wait fields `due`, `ttl` and `attempts`. A call without
# them is still written as version 1, so that a node of an older release delivers it
# during a rolling upgrade; every version here is read.
ENVELOPE_VERSION = 2
READ_VERSIONS = frozenset({1, 2})

# Headers that describe one HTTP hop, or Bigpipe's own request, not the call.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "expect",
        "authorization",
        "cookie",
        # Standard Webhooks' headers are Bigpipe's to set when it signs (bigpipe.calls.signing)
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
_OWN_PREFIX = "x-bigpipe-"  # set by Bigpipe at delivery; a caller must not forge them


class InvalidRecord(ValueError):
    """A record on a call topic that is not a call envelope Bigpipe can deliver."""


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs more per call
class Call:
    id: str
    url: str
    data: str
    caller: str
    created_ms: int
    headers: dict[str, str]
    # Set on calls an operator sent again (bigpipe.redrive): only this group delivers it.
    group: str | None = None
    redrive: int = 0  # how many times a dead letter of this call was redriven
    replay: bool = False  # sent again from the log by `bigpipe replay`
    due_ms: int = 0  # Unix ms before which it is not attempted (0: at once)
    ttl_ms: int | None = None  # not attempted after created_ms + ttl_ms; None: the group's
    attempts: int = 0  # attempts already made, before it last waited in a delay topic
    idempotency_key: str | None = None  # the caller's key (bigpipe.calls.dedup)
    # "callback" and/or "failure_callback" -> URL (bigpipe.calls.callbacks)
    callbacks: dict[str, str] | None = None


def new_call_id() -> str:
    """32 hex digits: the acceptance time in Unix ms (48 bits), then 80 random bits, as a
    UUIDv7 orders them: unique in practice, and ids sort by time, so the status views
    (bigpipe.calls.status_view) append to their index instead of writing all over it (a
    sixth of the cost). Python's generator is seeded from os.urandom at start-up; uuid4
    makes a system call per id, six times slower."""
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


def new_call(
    url: str,
    data: str,
    caller: str,
    headers: dict[str, str],
    delay_ms: int = 0,
    ttl_ms: int | None = None,
    idempotency_key: str | None = None,
    callbacks: dict[str, str] | None = None,
) -> Call:
    now = int(time.time() * 1000)
    due = now + delay_ms if delay_ms else 0
    return Call(
        new_call_id(),
        url,
        data,
        caller,
        now,
        headers,
        due_ms=due,
        ttl_ms=ttl_ms,
        idempotency_key=idempotency_key,
        callbacks=callbacks or None,
    )


def envelope_of(call: Call) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "v": 1,
        "id": call.id,
        "url": call.url,
        "data": call.data,
        "caller": call.caller,
        "ts": call.created_ms,
        "headers": call.headers,
    }
    # Only on calls sent again, so a call as accepted keeps its small, stable shape.
    if call.group is not None:
        envelope["group"] = call.group
    if call.redrive:
        envelope["redrive"] = call.redrive
    if call.replay:
        envelope["replay"] = True
    if call.idempotency_key is not None:  # optional in both versions: older readers skip it
        envelope["ikey"] = call.idempotency_key
    if call.callbacks:
        envelope["callbacks"] = call.callbacks
    if call.due_ms or call.ttl_ms is not None or call.attempts:
        envelope.update(
            v=ENVELOPE_VERSION, due=call.due_ms, ttl=call.ttl_ms, attempts=call.attempts
        )
    return envelope


def encode_call(call: Call) -> bytes:
    return orjson.dumps(envelope_of(call))


def decode_call(value: bytes | None) -> Call:
    """Parse a record value, raising InvalidRecord with the reason when it is not a call."""
    if not value:
        raise InvalidRecord("empty record")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRecord("not a JSON object")
    version = obj.get("v")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise InvalidRecord(f"unsupported envelope version {version!r}")
    fields = {"id": str, "url": str, "data": str, "caller": str, "ts": int, "headers": dict}
    for name, kind in fields.items():
        if not isinstance(obj.get(name), kind):
            raise InvalidRecord(f"field {name!r} missing or not {kind.__name__}")
    headers = obj["headers"]
    if not all(isinstance(v, str) for v in headers.values()):
        raise InvalidRecord("field 'headers' has a non-string value")
    group, redrive, replay = obj.get("group"), obj.get("redrive", 0), obj.get("replay", False)
    if not (group is None or isinstance(group, str)) or type(redrive) is not int:
        raise InvalidRecord("field 'group' or 'redrive' of the wrong type")
    ikey = obj.get("ikey")
    if ikey is not None and not isinstance(ikey, str):
        raise InvalidRecord("field 'ikey' is not a string")
    callbacks = obj.get("callbacks")
    if callbacks is not None and not (
        isinstance(callbacks, dict) and all(isinstance(v, str) for v in callbacks.values())
    ):
        raise InvalidRecord("field 'callbacks' is not an object of URLs")
    # An older Bigpipe also wrote "denyPrivate"; delivery now reads it from the ACL in force.
    call = Call(
        obj["id"],
        obj["url"],
        obj["data"],
        obj["caller"],
        obj["ts"],
        headers,
        group,
        redrive,
        replay is True,
        idempotency_key=ikey,
        callbacks=callbacks,
    )
    if version == 2:
        call.due_ms = _whole(obj, "due", 0)
        call.ttl_ms = _whole(obj, "ttl", None)
        call.attempts = _whole(obj, "attempts", 0)
    return call


def _whole(obj: dict[str, Any], name: str, absent: int | None) -> int | None:
    """A version-2 field: a non-negative integer, or null/absent for `absent`."""
    value = obj.get(name)
    if value is None:
        return absent
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRecord(f"field {name!r} not a non-negative integer")
    return value


def forwardable_headers(headers: Iterable[tuple[str, str]], secret: str) -> dict[str, str]:
    """The caller's headers worth passing to the downstream.

    Drops hop-by-hop headers, those naming Bigpipe's own request, credentials,
    any header that carries the caller's secret, and values that are not UTF-8.
    Repeated headers are joined with ", " as RFC 9110 allows.
    """
    kept: dict[str, str] = {}
    hop_named: list[str] = []
    for raw_name, value in headers:
        name = _forwarded_name(raw_name)
        if name is None:
            if raw_name.lower() == "connection":
                hop_named.extend(token.strip().lower() for token in value.split(","))
            continue
        if secret and secret in value:
            continue
        if not (value.isascii() or _is_utf8(value)):  # obs-text bytes: no faithful way on
            continue
        kept[name] = f"{kept[name]}, {value}" if name in kept else value
    if hop_named:  # headers that the Connection header names are hop-by-hop too
        kept = {name: value for name, value in kept.items() if name.lower() not in hop_named}
    return kept


_forwarded_names: dict[str, str | None] = {}  # header names repeat: decide each one once


def _forwarded_name(raw_name: str) -> str | None:
    """The header's name as plain str (aiohttp hands out istr) if it may go on, else None."""
    try:
        return _forwarded_names[raw_name]
    except KeyError:
        pass
    lower = raw_name.lower()
    name = None if lower in _NOT_FORWARDED or lower.startswith(_OWN_PREFIX) else str(raw_name)
    if len(_forwarded_names) >= 1024:  # names are the caller's to choose: keep the cache small
        _forwarded_names.clear()
    _forwarded_names[raw_name] = name
    return name


def _is_utf8(text: str) -> bool:
    """False for strings holding surrogate escapes of bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_dead_letter(
    *,
    value: bytes | None,
    call: Call | None,
    topic: str,
    partition: int,
    offset: int,
    group_id: str,
    attempts: int,
    last_status: int | None,
    last_error: str,
    first_attempt_ms: int | None,
    reason: str = "failed",
    max_bytes: int | None = None,
) -> bytes:
    """A dead letter keeps the original envelope (or raw bytes) plus why delivery gave up.

    Past `max_bytes`, the call's `data` (or `raw`) is cut to what fits, and `cut` says
    so, with the original's length and SHA-256; every other field is kept whole.
    """
    # The call as it was when it gave up (a call that waited in a delay topic carries its
    # attempts); a record of the Go original is kept in our format.
    envelope = envelope_of(call) if call is not None else None
    record: dict[str, Any] = {
        "v": 1,
        "reason": reason,
        "call": envelope,
        "raw": None if call is not None else base64.b64encode(value or b"").decode(),
        "source": {"topic": topic, "partition": partition, "offset": offset, "group": group_id},
        "attempts": attempts,
        "lastStatus": last_status,
        "lastError": last_error,
        "firstAttemptAt": first_attempt_ms,
        "failedAt": int(time.time() * 1000),
        "cut": None,
    }
    encoded = orjson.dumps(record)
    if max_bytes is None or len(encoded) <= max_bytes:
        return encoded
    if envelope is not None:
        return _cut(record, "call.data", envelope["data"].encode(), max_bytes)
    return _cut(record, "raw", value or b"", max_bytes)


def _cut(record: dict[str, Any], name: str, whole: bytes, max_bytes: int) -> bytes:
    """The record with field `name` cut to the longest prefix of `whole` that fits."""
    record["cut"] = {
        "field": name,
        "length": len(whole),
        "sha256": hashlib.sha256(whole).hexdigest(),
    }

    def encode(keep: int) -> bytes:
        part = whole[:keep]
        if name == "raw":
            record["raw"] = base64.b64encode(part).decode()
        else:  # a cut inside a UTF-8 sequence drops that character
            record["call"]["data"] = part.decode("utf-8", "ignore")
        return orjson.dumps(record)

    base = len(encode(0))
    keep = len(whole)
    encoded = encode(keep)
    while len(encoded) > max_bytes and keep > 0:
        # Escapes make the JSON longer than the data: scale by what a byte costs in it.
        per_byte = (len(encoded) - base) / keep
        keep = max(0, min(keep - 1, int((max_bytes - base) / per_byte)))
        encoded = encode(keep)
    return encoded
