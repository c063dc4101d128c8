"""The Kafka record formats: a call envelope, and the dead letter that wraps one.

Both are small, versioned JSON objects so that kcat, or any other tool,
can read a topic without Bigpipe. The README documents every field.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

ENVELOPE_VERSION = 1

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
    }
)
_OWN_PREFIX = "x-bigpipe-"  # set by Bigpipe at delivery; a caller must not forge them


class InvalidRecord(ValueError):
    """A record on a call topic that is not a call envelope Bigpipe can deliver."""


@dataclass(slots=True, frozen=True)
class Call:
    id: str
    url: str
    data: str
    caller: str
    created_ms: int
    headers: dict[str, str]
    deny_private: bool = False  # delivery must refuse non-public addresses (SSRF)


def new_call_id() -> str:
    """128 random bits in hex: unique in practice. Python's generator is seeded from
    os.urandom at start-up; uuid4 makes a system call per id, six times slower."""
    return f"{random.getrandbits(128):032x}"


def new_call(
    url: str, data: str, caller: str, headers: dict[str, str], deny_private: bool = False
) -> Call:
    return Call(new_call_id(), url, data, caller, int(time.time() * 1000), headers, deny_private)


def encode_call(call: Call) -> bytes:
    envelope = {
        "v": ENVELOPE_VERSION,
        "id": call.id,
        "url": call.url,
        "data": call.data,
        "caller": call.caller,
        "ts": call.created_ms,
        "headers": call.headers,
    }
    if call.deny_private:  # written only when set, so the common envelope stays small
        envelope["denyPrivate"] = True
    return orjson.dumps(envelope)


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
    if obj.get("v") != ENVELOPE_VERSION:
        raise InvalidRecord(f"unsupported envelope version {obj.get('v')!r}")
    fields = {"id": str, "url": str, "data": str, "caller": str, "ts": int, "headers": dict}
    for name, kind in fields.items():
        if not isinstance(obj.get(name), kind):
            raise InvalidRecord(f"field {name!r} missing or not {kind.__name__}")
    headers = obj["headers"]
    if not all(isinstance(v, str) for v in headers.values()):
        raise InvalidRecord("field 'headers' has a non-string value")
    deny_private = obj.get("denyPrivate", False)
    if not isinstance(deny_private, bool):
        raise InvalidRecord("field 'denyPrivate' is not a boolean")
    return Call(obj["id"], obj["url"], obj["data"], obj["caller"], obj["ts"], headers, deny_private)


def forwardable_headers(headers: Iterable[tuple[str, str]], secret: str) -> dict[str, str]:
    """The caller's headers worth passing to the downstream.

    Drops hop-by-hop headers, those naming Bigpipe's own request, credentials,
    any header that carries the caller's secret, and values that are not UTF-8.
    Repeated headers are joined with ", " as RFC 9110 allows.
    """
    pairs = list(headers)
    hop_named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    kept: dict[str, str] = {}
    for raw_name, value in pairs:
        name = str(raw_name)  # aiohttp hands out istr; the envelope wants plain str
        lower = name.lower()
        if lower in _NOT_FORWARDED or lower in hop_named or lower.startswith(_OWN_PREFIX):
            continue
        if secret and secret in value:
            continue
        if not _is_utf8(value):  # obs-text bytes: no faithful way to pass them on
            continue
        kept[name] = f"{kept[name]}, {value}" if name in kept else value
    return kept


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
) -> bytes:
    """A dead letter keeps the original envelope (or raw bytes) plus why delivery gave up."""
    record: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "call": orjson.loads(value) if call is not None and value else None,
        "raw": None if call is not None else base64.b64encode(value or b"").decode(),
        "source": {"topic": topic, "partition": partition, "offset": offset, "group": group_id},
        "attempts": attempts,
        "lastStatus": last_status,
        "lastError": last_error,
        "firstAttemptAt": first_attempt_ms,
        "failedAt": int(time.time() * 1000),
    }
    return orjson.dumps(record)
