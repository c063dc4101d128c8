"""Compatibility with the Go original (owenliang/bigpipe), for a switch-over without loss.

Records: the original wrote Go's `json.Marshal` of its CallMessage struct,
`{"Headers":{"Name":["v",...]},"Url":"…","Data":"…","Topic":"…","Partition":0,"CreateTime":ms}`.
Go marshals struct fields in declaration order, so such a record always starts
with `{"Headers":`, and ours with `{"v":`: one prefix test tells them apart, and
our own hot path parses nothing twice.

A Go record has neither a call id nor a caller. Its id is derived from where it
sits in Kafka (topic, partition, offset), so a redelivery carries the same id.
Its caller is `GO_CALLER` (empty): delivery judges it by the rules of the callers
that write its topic (see `go_caller_entry`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import orjson

from bigpipe.calls.envelope import Call, InvalidRecord, forwardable_headers
from bigpipe.config import AclEntry

GO_RECORD_PREFIX = b'{"Headers":'
GO_CALLER = ""  # a Go record names no caller; see go_caller_entry
GO_CALLER_NAME = "(Go original)"


def is_go_record(value: bytes | None) -> bool:
    return bool(value) and value.startswith(GO_RECORD_PREFIX)  # type: ignore[union-attr]


def go_call_id(topic: str, partition: int, offset: int) -> str:
    """32 hex digits that name the record's place in Kafka: the same on every redelivery."""
    return hashlib.sha256(f"{topic}/{partition}/{offset}".encode()).hexdigest()[:32]


def decode_go_record(value: bytes, topic: str, partition: int, offset: int) -> Call:
    """A record written by the Go original, as a call; InvalidRecord names what is wrong.

    Every field is required, with the types the original's decoder demanded.
    """
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord(f"Go record, not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRecord("Go record, not a JSON object")
    for name, kinds in _GO_FIELDS.items():
        if not isinstance(obj.get(name), kinds) or isinstance(obj.get(name), bool):
            raise InvalidRecord(f"Go record, field {name!r} missing or of the wrong type")
    headers = obj["Headers"]
    if not all(
        isinstance(values, list) and all(isinstance(v, str) for v in values)
        for values in headers.values()
    ):
        raise InvalidRecord("Go record, field 'Headers' must map names to lists of strings")
    return Call(
        go_call_id(topic, partition, offset),
        obj["Url"],
        obj["Data"],
        GO_CALLER,
        int(obj["CreateTime"]),
        # The same filter as a call of ours: credentials and hop-by-hop headers stay behind.
        forwardable_headers(_header_lines(headers), secret=""),
    )


_GO_FIELDS: dict[str, type | tuple[type, ...]] = {
    "Headers": dict,
    "Url": str,
    "Data": str,
    "Topic": str,
    "Partition": (int, float),
    "CreateTime": (int, float),
}


def _header_lines(headers: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
    for name, values in headers.items():
        for value in values:
            yield name, value


def go_caller_entry(entries: tuple[AclEntry, ...], topic: str) -> AclEntry | None:
    """The ACL rules a Go record of `topic` is delivered under: those of its topic's callers.

    It may go wherever at least one of them may call: no rules if one of them has none,
    else the union of their `allow` lists, with `denyPrivate` only if all of them have it.
    None when no caller writes the topic any more: its calls are refused, as a removed
    caller's are.
    """
    writers = [entry for entry in entries if entry.topic == topic]
    if not writers:
        return None
    unrestricted = any(not entry.allow for entry in writers)
    allow = () if unrestricted else tuple(rule for entry in writers for rule in entry.allow)
    return AclEntry(
        name=GO_CALLER_NAME,
        secret_sha256=b"",
        topic=topic,
        allow=allow,
        deny_private=all(entry.deny_private for entry in writers),
    )


# ---------------------------------------------------------------- /rpc/call replies
# The original's msg strings (server/handler.go), for clients that match on them.
GO_ACCEPTED = "发送成功"
GO_BAD_JSON = "JSON无效"
GO_BAD_URL = "url无效"
GO_BAD_DATA = "data无效"
GO_BAD_PARTITION_KEY = "partition_key无效"
GO_BAD_ACL = "acl无效"
GO_BAD_ACL_NAME = "acl.name"  # sic: the original's messages for these two name the field only
GO_BAD_ACL_SECRET = "acl.secret"
GO_REFUSED = "权限错误"
GO_OVERLOADED = "超过负载"
GO_INTERNAL = "内部错误"
# The original set no Content-Type; Go's net/http then sniffs one from the body's start.
GO_CONTENT_TYPE = "text/plain; charset=utf-8"


def go_reply_body(errno: int, msg: str) -> bytes:
    """Go's json.Marshal of map{errno, msg, data: ""}: keys sorted, UTF-8 as is."""
    return orjson.dumps({"data": "", "errno": errno, "msg": msg})


def go_field_problem(payload: Any) -> str | None:
    """The original's message for the first field it would refuse, in its order, or None.

    `payload` is the body, decoded (a body that is no JSON is GO_BAD_JSON). Its order
    differs from ours (url, data and partition_key before acl), and it requires
    partition_key, so a request with several faults gets the same message.
    """
    if payload is None:  # Go decodes null into an empty map: every field is missing
        payload = {}
    if not isinstance(payload, dict):
        return GO_BAD_JSON
    for field, problem in (
        ("url", GO_BAD_URL),
        ("data", GO_BAD_DATA),
        ("partition_key", GO_BAD_PARTITION_KEY),
    ):
        if not isinstance(payload.get(field), str):
            return problem
    acl = payload.get("acl")
    if not isinstance(acl, dict):
        return GO_BAD_ACL
    if not isinstance(acl.get("name"), str):
        return GO_BAD_ACL_NAME
    if not isinstance(acl.get("secret"), str):
        return GO_BAD_ACL_SECRET
    return None
