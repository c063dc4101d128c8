"""Which calls an operator command acts on: the filters of `bigpipe dlq` and `bigpipe replay`
and of the admin endpoints, parsed the same way from a command line or a query string."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from bigpipe.config import Config, ConsumerConfig

DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class SelectionError(ValueError):
    """A filter an operator gave that cannot be understood; the text says how to fix it."""


def parse_time(text: str, name: str, now_ms: int | None = None) -> int:
    """Unix milliseconds from RFC 3339 (`2026-12-04T08:00:00Z`, a date alone is midnight
    UTC), Unix milliseconds, or a duration ago (`90s`, `15m`, `2h`, `7d`)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    text = text.strip()
    if text.isdigit():
        return int(text)
    if match := DURATION.match(text):
        return now_ms - int(float(match[1]) * SECONDS[match[2]] * 1000)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SelectionError(
            f"{name}: {text!r} is not a time; give RFC 3339 (2026-12-04T08:00:00Z), "
            "Unix milliseconds, or a duration ago (15m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Filters:
    """Every filter is optional; a call must match all that are given."""

    groups: tuple[str, ...] = ()  # "groupId", or "topic/groupId" where ids repeat
    since_ms: int | None = None
    until_ms: int | None = None
    url_prefix: str | None = None
    host: str | None = None  # the destination's host name, as in the URL
    status: int | None = None  # the last HTTP status (dead letters)
    error: str | None = None  # text in the last error (dead letters), case-insensitive
    caller: str | None = None

    def matches_call(self, call: Mapping[str, Any]) -> bool:
        url = call.get("url", "")
        if self.url_prefix is not None and not url.startswith(self.url_prefix):
            return False
        if self.host is not None and (urlsplit(url).hostname or "") != self.host.lower():
            return False
        return self.caller is None or call.get("caller") == self.caller

    def choose_groups(self, config: Config) -> list[ConsumerConfig]:
        """The consumer groups named (all of them when none is), in config order."""
        if not self.groups:
            return list(config.consumers)
        chosen = []
        for name in self.groups:
            found = [c for c in config.consumers if name in (c.group_id, f"{c.topic}/{c.group_id}")]
            if not found:
                known = ", ".join(f"{c.topic}/{c.group_id}" for c in config.consumers)
                raise SelectionError(
                    f"--group {name}: no such consumer group in kafka.consumer.list "
                    f"(there are: {known or 'none'})"
                )
            chosen.extend(c for c in found if c not in chosen)
        return chosen


FILTER_NAMES = ("group", "since", "until", "url_prefix", "host", "status", "error", "caller")


def parse_filters(values: Mapping[str, Any]) -> Filters:
    """Filters from option values by name (FILTER_NAMES; `group` may be a list)."""
    groups = values.get("group") or ()
    if isinstance(groups, str):
        groups = (groups,)
    since = _time(values, "since")
    until = _time(values, "until")
    if since is not None and until is not None and until <= since:
        raise SelectionError("--until: must be later than --since")
    status = values.get("status")
    if status is not None:
        if not str(status).isdigit() or not 100 <= int(status) <= 599:
            raise SelectionError(f"--status: {status!r} is not an HTTP status (100-599)")
        status = int(status)
    return Filters(
        groups=tuple(_strings(groups)),
        since_ms=since,
        until_ms=until,
        url_prefix=values.get("url_prefix") or None,
        host=(values.get("host") or "").lower() or None,
        status=status,
        error=values.get("error") or None,
        caller=values.get("caller") or None,
    )


def _time(values: Mapping[str, Any], name: str) -> int | None:
    text = values.get(name)
    return None if text in (None, "") else parse_time(str(text), f"--{name}")


def _strings(values: Sequence[Any]) -> list[str]:
    return [str(v) for v in values if str(v)]
