"""The admin endpoints: dead letters and replay over HTTP, behind a bearer token.

They take the same filters as `bigpipe dlq` and `bigpipe replay`, by the same
names, as query parameters. With `http.admin.token` empty (the default) they
answer 404, as if absent; a reload can turn them on or off. The token is
compared in constant time, as SHA-256 digests (so neither its content nor its
length leaks through timing), and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any

from aiohttp import web
from confluent_kafka import KafkaException

from bigpipe.ingest.server import CALLER_ERROR, INTERNAL_ERROR, OK, ServedNode, reply
from bigpipe.operate.commands import Failed
from bigpipe.operate.dlq import RedriveOptions, dead_letters, find, redrive
from bigpipe.operate.replay import replay
from bigpipe.operate.resend import ResendFailed
from bigpipe.operate.selection import FILTER_NAMES, Filters, SelectionError, parse_filters

LIST_LIMIT = 1000  # dead letters in one /admin/dlq answer, unless `limit` says otherwise
Handler = Callable[[web.BaseRequest], Awaitable[web.Response]]


def admin_routes(node: ServedNode) -> list[tuple[str, str, Handler]]:
    def guarded(work: Callable[[web.BaseRequest], Any]) -> Handler:
        async def handle(request: web.BaseRequest) -> web.Response:
            token = node.config.admin_token
            if not token:
                return reply(404, CALLER_ERROR, "not found")
            if not _authorized(request.headers.get("Authorization", ""), token):
                response = reply(
                    401,
                    CALLER_ERROR,
                    "admin endpoints need Authorization: Bearer <http.admin.token>",
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="bigpipe-admin"'
                return response
            try:
                data = await asyncio.to_thread(work, request)
            except SelectionError as exc:
                return reply(400, CALLER_ERROR, str(exc))
            except (LookupError, Failed) as exc:
                return reply(404, CALLER_ERROR, str(exc.args[0]))
            except (KafkaException, ResendFailed) as exc:
                return reply(503, INTERNAL_ERROR, f"kafka: {exc}; retry later")
            return reply(200, OK, "success", data)

        return handle

    def list_letters(request: web.BaseRequest) -> dict[str, Any]:
        limit = _int(request, "limit", LIST_LIMIT)
        rows = islice(dead_letters(node.config, _filters(request)), limit)
        letters = [letter.summary() for letter in rows]
        return {"deadLetters": letters, "count": len(letters), "limit": limit}

    def show(request: web.BaseRequest) -> dict[str, Any]:
        call_id = request.query.get("id", "")
        if not call_id:
            raise SelectionError("id: give the call id, ?id=…")
        groups = tuple(request.query.getall("group", ()))
        found = find(node.config, call_id, Filters(groups=groups))
        if not found:
            raise LookupError(f"no dead letter of call {call_id}")
        return {"deadLetters": [letter.detail() for letter in found]}

    def redrive_letters(request: web.BaseRequest) -> dict[str, Any]:
        options = RedriveOptions(
            to_url=request.query.get("to_url") or None,
            force=_flag(request, "force"),
            dry_run=_flag(request, "dry_run"),
        )
        letters = list(dead_letters(node.config, _filters(request)))
        return redrive(node.config, letters, options).as_dict()

    def replay_window(request: web.BaseRequest) -> dict[str, Any]:
        report = replay(
            node.config,
            _filters(request),
            to_url=request.query.get("to_url") or None,
            dry_run=_flag(request, "dry_run"),
        )
        return report.as_dict()

    return [
        ("GET", "/admin/dlq", guarded(list_letters)),
        ("GET", "/admin/dlq/show", guarded(show)),
        ("POST", "/admin/dlq/redrive", guarded(redrive_letters)),
        ("POST", "/admin/replay", guarded(replay_window)),
    ]


def _authorized(header: str, token: str) -> bool:
    scheme, _, offered = header.partition(" ")
    given = hashlib.sha256(offered.strip().encode()).digest()
    expected = hashlib.sha256(token.encode()).digest()
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"


def _filters(request: web.BaseRequest) -> Filters:
    values: dict[str, Any] = {name: request.query.get(name) for name in FILTER_NAMES}
    values["group"] = request.query.getall("group", [])
    return parse_filters(values)


def _flag(request: web.BaseRequest, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _int(request: web.BaseRequest, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) == 0:
        raise SelectionError(f"{name}: must be a positive integer, got {text!r}")
    return int(text)
