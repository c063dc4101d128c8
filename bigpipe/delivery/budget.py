"""A consumer group's budget: `rateLimit` and `concurrency` hold for the whole group.

Every worker of every node is a member of the group, and together they stay within
the budget. No extra service: every member reads the same facts from Kafka, twice a
second, and works out every member's share from them the same way, so all agree:

- who holds which partitions (the group's description), and
- which of those partitions have a backlog (high watermark above the committed offset).

Shares follow the partitions, as in Uber's uForwarder, and are work-conserving: the
budget goes to the members whose partitions have a backlog, in proportion to how many
such partitions each holds. A member whose partitions have none keeps only a floor (see
`shares`), so that a call reaching it is not held until the next refresh. With no
backlog anywhere, the budget is split by partitions held.

A member lowers its concurrency at once, but raises it at once only when no other
member's share was cut at the same time; otherwise it waits one more refresh, which
gives the members that were cut time to see the cut and stop taking slots.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from bigpipe.config import Config, ConsumerConfig
from bigpipe.delivery.limits import Limits
from bigpipe.kafka import client_settings
from bigpipe.stats import GroupCounters

log = logging.getLogger(__name__)

REFRESH_SECONDS = 0.25  # how often each member reads the group's state and its share
QUERY_TIMEOUT = 2.0
# While Kafka does not answer, ask again ever more slowly, up to this: an outage must not
# turn into a stream of admin requests that time out one after another.
UNKNOWN_BACKOFF_MAX_SECONDS = 5.0
# What a member holding partitions without a backlog keeps: one concurrency slot if the
# slots are at least twice the members that hold partitions (else the slots all go where
# the backlog is), and with it its part of this fraction of the rate.
FLOOR_FRACTION = 0.05
# With more members holding a backlog than slots, the slots take turns, this long each.
ROTATE_SECONDS = 2.0
# The rate of a member with no share at all: the rate limiter needs one above zero, and
# such a member has no slot, so it sends nothing.
NO_RATE = 1e-3


@dataclass(frozen=True, slots=True)
class Share:
    rate: float
    concurrency: int


NOTHING = Share(NO_RATE, 0)


def shares(
    rate: float,
    concurrency: int,
    assignment: Mapping[str, Collection[int]],
    backlog: Mapping[int, int],
    epoch: int = 0,
) -> dict[str, Share]:
    """Every member's share of the group's budget; the same on every member.

    `assignment` maps member ids to the partitions they hold, `backlog` partitions to
    the calls after their committed offset, `epoch` counts ROTATE_SECONDS periods of
    wall-clock time (used only when the slots are fewer than the members with a backlog).
    """
    holders = sorted(member for member, partitions in assignment.items() if partitions)
    busy = {m: sum(backlog.get(p, 0) > 0 for p in assignment[m]) for m in holders}
    busy = {m: weight for m, weight in busy.items() if weight}
    weights = busy or {m: len(assignment[m]) for m in holders}
    floor_slots = int(bool(busy) and concurrency >= 2 * len(holders))
    slots = {m: floor_slots for m in holders}
    spare = concurrency - floor_slots * len(holders)
    if not floor_slots and len(weights) > spare:  # fewer slots than busy members: turns
        ordered = sorted(weights)
        start = epoch % len(ordered)
        weights = {m: weights[m] for m in (ordered + ordered)[start : start + spare]}
    for member, extra in _largest_remainder(spare, weights, least=1 - floor_slots).items():
        slots[member] += extra
    # A member without a slot sends nothing: its floor would be budget lost.
    idle = [m for m in holders if slots[m] and m not in weights]
    floor_rate = rate * FLOOR_FRACTION / len(holders)
    spread = rate - floor_rate * len(idle)
    total = sum(weights.values())
    result = dict.fromkeys(assignment, NOTHING)
    for member in weights:
        result[member] = Share(spread * weights[member] / total, slots[member])
    for member in idle:
        result[member] = Share(floor_rate, slots[member])
    return result


def _largest_remainder(slots: int, weights: Mapping[str, int], least: int) -> dict[str, int]:
    """`slots` split by weight, each member at least `least` (callers ensure there are
    enough); leftover slots go to the largest remainders, ties to the lower member id."""
    if not weights:
        return {}
    given = dict.fromkeys(weights, least)
    left = slots - least * len(weights)
    total = sum(weights.values())
    exact = {m: left * w / total for m, w in weights.items()}
    for member, amount in exact.items():
        given[member] += int(amount)
    short = left - sum(int(amount) for amount in exact.values())
    by_remainder = sorted(weights, key=lambda m: (-(exact[m] - int(exact[m])), m))
    for member in by_remainder[:short]:
        given[member] += 1
    return given


@dataclass(frozen=True)
class GroupState:
    """What every member reads from Kafka to work out the shares."""

    stable: bool
    assignment: dict[str, list[int]]  # member id -> partitions of the topic it holds
    backlog: dict[int, int]  # partition -> calls after the committed offset


def read_group_state(admin: AdminClient, group_id: str, topic: str) -> GroupState:
    """The group's members, their partitions and those partitions' backlog. Blocking.

    Raises KafkaException when Kafka does not answer.
    """
    description = admin.describe_consumer_groups([group_id], request_timeout=QUERY_TIMEOUT)
    group = description[group_id].result()
    assignment = {
        member.member_id: sorted(
            tp.partition for tp in member.assignment.topic_partitions if tp.topic == topic
        )
        for member in group.members
    }
    partitions = sorted({p for held in assignment.values() for p in held})
    stable = group.state == ConsumerGroupState.STABLE
    if not partitions:
        return GroupState(stable, assignment, {})
    request = [ConsumerGroupTopicPartitions(group_id)]
    listed = admin.list_consumer_group_offsets(request, request_timeout=QUERY_TIMEOUT)
    committed = {
        tp.partition: tp.offset
        for tp in listed[group_id].result().topic_partitions
        if tp.topic == topic
    }
    highs = _offsets(admin, topic, partitions, OffsetSpec.latest())
    never = [p for p in partitions if committed.get(p, -1) < 0]
    starts = committed | (_offsets(admin, topic, never, OffsetSpec.earliest()) if never else {})
    backlog = {p: max(0, highs[p] - max(starts.get(p, 0), 0)) for p in partitions}
    return GroupState(stable, assignment, backlog)


def _offsets(admin: AdminClient, topic: str, partitions: list[int], spec: OffsetSpec) -> dict:
    asked = {TopicPartition(topic, p): spec for p in partitions}
    futures = admin.list_offsets(asked, request_timeout=QUERY_TIMEOUT)
    # Every request ends before any result is read: reading stops at the first failure,
    # and librdkafka's admin requests are not to be left running behind it.
    concurrent.futures.wait(futures.values())
    return {tp.partition: future.result().offset for tp, future in futures.items()}


class GroupBudget:
    """Keeps one member's Limits at its share of the group's budget."""

    def __init__(
        self,
        config: Config,
        consumer: ConsumerConfig,
        member_id: Callable[[], str | None],
        limits: Limits,
        counters: GroupCounters,
    ) -> None:
        self._consumer = consumer
        self._member_id = member_id  # this member's id in the group; None until it joined
        self._limits = limits
        self._counters = counters  # shows the share in /stats and /metrics
        self._admin = AdminClient(client_settings(config))
        self._computed: dict[str, Share] = {}  # every member's share, as last worked out
        self.share = NOTHING  # this member's share in force
        self._enforce(NOTHING)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def _name(self) -> str:
        return f"{self._consumer.topic}/{self._consumer.group_id}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name=f"budget {self._name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def update(self, consumer: ConsumerConfig) -> None:
        """A reload changed the group's settings: apply this member's share of the new
        budget at once, and work the shares out afresh."""
        old, self._consumer = self._consumer, consumer
        self._enforce(
            Share(
                max(NO_RATE, self.share.rate * consumer.rate_limit / old.rate_limit),
                self.share.concurrency * consumer.concurrency // old.concurrency,
            )
        )  # the same part of the new budget until the next reckoning, never more
        self._computed = {}
        self.assignment_changed()

    def assignment_changed(self) -> None:
        """Partitions came or went: refresh now rather than at the next tick."""
        self._changed.set()

    async def _refresh_forever(self) -> None:
        wait = REFRESH_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
            self._changed.clear()
            try:
                state = await asyncio.to_thread(
                    read_group_state, self._admin, self._consumer.group_id, self._consumer.topic
                )
            except KafkaException as exc:  # keep the shares in force; ask again, later
                log.debug("%s: group state unknown: %s", self._name, exc)
                wait = min(UNKNOWN_BACKOFF_MAX_SECONDS, wait * 2)
                continue
            wait = REFRESH_SECONDS
            self._apply(state)

    def _apply(self, state: GroupState) -> None:
        if not state.stable:  # mid-rebalance: the assignment read may be half old
            return
        config = self._consumer
        computed = shares(
            config.rate_limit,
            config.concurrency,
            state.assignment,
            state.backlog,
            int(time.time() // ROTATE_SECONDS),
        )
        me = self._member_id()
        share = computed.get(me, NOTHING) if me else NOTHING
        if share.concurrency > self.share.concurrency and self._busy_cut(computed, me, state):
            # Busy members lose slots as this member gains them: they may still be using
            # them until their own refresh. Raise only as far as last time's reckoning agreed.
            before = self._computed.get(me, NOTHING).concurrency
            share = Share(share.rate, max(self.share.concurrency, min(share.concurrency, before)))
        self._computed = computed
        if share != self.share:
            log.debug("%s: share %s -> %s", self._name, self.share, share)
            self._enforce(share)

    def _enforce(self, share: Share) -> None:
        self.share = share
        self._limits.update(share.rate, share.concurrency)
        self._counters.budgetRate = share.rate if share.concurrency else 0.0
        self._counters.budgetConcurrency = share.concurrency

    def _busy_cut(self, computed: Mapping[str, Share], me: str | None, state: GroupState) -> bool:
        """May another member lose slots it is using now? Unknown at a first reckoning (a
        member that just joined, or after a reload), unless this member is the group's only
        one. A member whose partitions have no backlog has nothing in flight: every call it
        read is committed, so it uses no slot and its cut cannot make an overshoot."""
        if not self._computed:
            return set(computed) != {me}
        return any(
            computed.get(member, NOTHING).concurrency < share.concurrency
            and any(state.backlog.get(p, 0) > 0 for p in state.assignment.get(member, ()))
            for member, share in self._computed.items()
            if member != me
        )
