"""The kinds of wait a call can have, each its own small class.

- `Due`: a call posted with `delay_ms` is not attempted before acceptance + delay_ms.
- `Expiry`: a call with a ttl (its own `ttl_ms`, else its group's `ttl`) is not
  attempted after acceptance + ttl; it is dead-lettered with reason `expired`.
"""

from __future__ import annotations

import asyncio
import time

from bigpipe.calls.envelope import Call


def now_ms() -> int:
    return int(time.time() * 1000)


class Due:
    """The time before which a call is not attempted, on the wall clock (Unix ms), since
    it was set on the accepting node and must mean the same on every other."""

    @staticmethod
    def remaining_s(call: Call) -> float:
        return max(0.0, (call.due_ms - now_ms()) / 1000)

    @classmethod
    async def wait(cls, call: Call) -> None:
        """Sleep until the call is due; at once if it is (or was never delayed)."""
        if call.due_ms and (left := cls.remaining_s(call)) > 0:
            await asyncio.sleep(left)


class Expiry:
    """When a call stops being attempted, if it ever does."""

    def __init__(self, call: Call, group_ttl_ms: int | None) -> None:
        ttl = call.ttl_ms if call.ttl_ms is not None else group_ttl_ms
        if call.group is not None:
            # Sent again by an operator (redrive, replay), who chose to deliver it now:
            # counted from its first acceptance, every ttl would already be over.
            ttl = None
        self.ttl_ms = ttl
        self.at_ms = None if ttl is None else call.created_ms + ttl

    def passed(self) -> bool:
        return self.at_ms is not None and now_ms() >= self.at_ms

    def cap(self, seconds: float) -> float:
        """A wait of `seconds`, cut short at the expiry: no point waiting beyond it."""
        if self.at_ms is None:
            return seconds
        return max(0.0, min(seconds, (self.at_ms - now_ms()) / 1000))

    def reason(self) -> str:
        return f"expired: not delivered within its ttl of {self.ttl_ms} ms"
