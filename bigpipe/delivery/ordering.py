"""Per-key ordering, a group's `ordering: "key"`: one call of a key at a time, in order.

A partition's calls are read in offset order, which for one key is acceptance order
(one key, one partition). Each call with a non-empty key is chained, as it is read,
behind the call of its key read just before it, and starts only once that one has
finished: delivered, dead-lettered (expired included), or skipped. Calls of other
keys, and calls without a key, are not chained: they flow as they always did, on
the same partition too.

A key's calls wait in memory, never in the delay topics. The commit point already
stops at a partition's first unfinished call, so a key's held calls and its waiting
head are all read again after a crash or a rebalance, from that point, in offset
order: first deliveries stay in order. Parking the head in a delay topic would
commit it, and after a crash its later calls, read again with nothing to say that
the head still waits, would overtake it. What holding costs instead: a key whose
head waits long (a long backoff, an open breaker, a Retry-After, a delay_ms)
pins its partition's commit point, so after a crash the partition's calls from
there on are delivered again; and held calls take memory, bounded per group (see
ConsumerGroup._steer: past `maxBuffered` held calls the group pauses, `paused:ordering`).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from confluent_kafka import Message

from bigpipe.config import ConsumerConfig
from bigpipe.stats import GroupCounters


def is_ordered(config: ConsumerConfig, message: Message) -> bool:
    """Is this record a call of the group's topic whose key orders it?"""
    return config.ordering == "key" and bool(message.key()) and message.topic() == config.topic


class Turn:
    """One call's place in its key's chain: `async with turn:` waits for the call before it."""

    __slots__ = ("_chain", "_key", "_mine", "_previous")

    def __init__(
        self,
        chain: KeyChains | None = None,
        key: bytes = b"",
        previous: asyncio.Event | None = None,
        mine: asyncio.Event | None = None,
    ) -> None:
        self._chain = chain
        self._key = key
        self._previous = previous  # set when the call of the key read before it finished
        self._mine = mine  # set when this call finishes

    async def __aenter__(self) -> None:
        if self._previous is None or self._previous.is_set():
            return
        assert self._chain is not None
        counters = self._chain.counters
        counters.orderingHeld += 1
        try:
            await self._previous.wait()
        finally:
            counters.orderingHeld -= 1

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._chain is not None and self._mine is not None:
            self._chain.finished(self._key, self._mine)


UNORDERED = Turn()  # waits for nothing, holds nothing back


class KeyChains:
    """The keys of one partition with a call read and not finished: each one's last call.

    Dropped with its partition on revoke or loss: its tasks are all cancelled then, and
    the partition's next owner reads them again in order from the commit point.
    """

    __slots__ = ("_last", "counters")

    def __init__(self, counters: GroupCounters) -> None:
        self.counters = counters
        self._last: dict[bytes, asyncio.Event] = {}

    def turn(self, key: bytes) -> Turn:
        """The turn of the call of `key` just read: after every call of `key` read before."""
        mine = asyncio.Event()
        turn = Turn(self, key, self._last.get(key), mine)
        self._last[key] = mine
        return turn

    def finished(self, key: bytes, mine: asyncio.Event) -> None:
        mine.set()
        if self._last.get(key) is mine:  # nothing of the key read after it: forget the key
            del self._last[key]
