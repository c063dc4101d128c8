"""A consumer group's budget: `rateLimit` and `concurrency` hold for the whole group.

Every worker of every node is a member of the group, and together they stay within
the budget. No extra service: four times a second every member writes what it holds to
a small topic (bigpipe.budget) and reads what the others wrote, and from those reports
works out every member's share the same way, so all agree:

- which partitions each member holds, and
- which of those partitions have a backlog (calls read and unfinished, or not yet read).

The reports come from what each member knows locally (its assignment, the high
watermark its fetches brought, its position), so the budget sends no admin request.
It used to ask the group coordinator (describe_consumer_groups and
list_consumer_group_offsets): librdkafka 2.16 aborts the process when such a request's
timeout races its answer (librdkafka issue 4605), which fault tests hit around broker
restarts and a young cluster's "coordinator load in progress".

Shares follow the partitions, as in Uber's uForwarder, and are work-conserving: the
budget goes to the members whose partitions have a backlog, in proportion to how many
such partitions each holds. A member whose partitions have none keeps only a floor (see
`shares`), so that a call reaching it is not held until the next refresh. With no
backlog anywhere, the budget is split by partitions held.

A member lowers its concurrency at once, and raises it only into slots that no other
member holds by its latest report. Each report says how many slots its member holds:
its concurrency in force, or the calls it has open if more (a member just cut still
has its calls open). So a member whose share grows waits until those whose shares
shrank have seen the cut and finished the calls over it: the sum of what all hold
never passes the budget. (Raising after one more refresh instead let 2 nodes x 2
workers held to 4 slots run 5 requests at once on a loaded machine.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from bigpipe.config import Config, ConsumerConfig
from bigpipe.delivery.limits import Limits
from bigpipe.ingest.producer import ProduceFailed, Producer
from bigpipe.kafka import BUDGET_TOPIC, client_settings
from bigpipe.stats import GroupCounters

log = logging.getLogger(__name__)

REFRESH_SECONDS = 0.25  # how often each member reports and works out its share
# A member not heard from for this long holds nothing (it died, or lost Kafka). When this
# member's own report has not come back for as long, Kafka is away: shares stay as they are.
LIVE_SECONDS = 2.0
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
    if not holders:  # say, a restarted node before the group hands it the dead one's part
        return dict.fromkeys(assignment, NOTHING)
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
    """What every member knows of the group to work out the shares."""

    stable: bool  # no partition is claimed by two members (a rebalance in progress)
    assignment: dict[str, list[int]]  # member id -> partitions of the topic it holds
    backlog: dict[int, int]  # partition -> calls after the committed offset
    slots: dict[str, int] = field(default_factory=dict)  # member id -> slots it holds


@dataclass(frozen=True, slots=True)
class Holding:
    """One member's report: the partitions it holds, with their backlog, and the slots
    it holds (None from a Bigpipe that did not report them)."""

    partitions: list[int]
    backlog: dict[int, int]
    slots: int | None = None


class Reports:
    """The latest report of every member of one group, and when it was heard. Pure."""

    def __init__(self) -> None:
        self._heard: dict[str, tuple[float, Holding]] = {}

    def hear(self, member: str, holding: Holding, now: float) -> None:
        self._heard[member] = (now, holding)

    def state(self, me: str, now: float) -> GroupState | None:
        """The group as the live reports tell it; None while this member's own report
        has not come back (Kafka away, or just joined): then nothing is known."""
        mine = self._heard.get(me)
        if mine is None or now - mine[0] > LIVE_SECONDS:
            return None
        live = {m: h for m, (at, h) in self._heard.items() if now - at <= LIVE_SECONDS}
        for member in [m for m in self._heard if m not in live]:
            del self._heard[member]  # members come and go with every restart: forget them
        claimed = [p for holding in live.values() for p in holding.partitions]
        backlog = {p: n for holding in live.values() for p, n in holding.backlog.items()}
        return GroupState(
            len(claimed) == len(set(claimed)),
            {m: h.partitions for m, h in live.items()},
            backlog,
            {m: h.slots for m, h in live.items() if h.slots is not None},
        )


class Exchange:
    """Writes this member's reports to BUDGET_TOPIC and reads every member's back."""

    def __init__(self, config: Config, consumer: ConsumerConfig) -> None:
        self._group = consumer.group_id
        self._topic = consumer.topic
        self._reports = Reports()
        self._sending: asyncio.Task[object] | None = None
        self._reader = Consumer(
            {
                # A report is news for LIVE_SECONDS only.
                **client_settings(config, {"fetch.wait.max.ms": 50}),
                "group.id": "bigpipe-budget",  # librdkafka wants one; never joined
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
            }
        )
        # From the end: older reports are stale, and the live ones come again at once.
        self._reader.assign([TopicPartition(BUDGET_TOPIC, 0, OFFSET_END)])

    def publish(self, producer: Producer, member: str, holding: Holding) -> None:
        """Send this member's report, unless the last one is still on its way."""
        if self._sending is not None and not self._sending.done():
            return
        value = orjson.dumps(
            {
                "topic": self._topic,
                "group": self._group,
                "member": member,
                "partitions": holding.partitions,
                "backlog": holding.backlog,
                "slots": holding.slots,
            },
            option=orjson.OPT_NON_STR_KEYS,
        )
        self._sending = asyncio.ensure_future(
            producer.send(BUDGET_TOPIC, value, self._group.encode())
        )
        self._sending.add_done_callback(_ignore_failure)

    def state(self, me: str) -> GroupState | None:
        """Read what arrived (without waiting) and tell the group as it stands now."""
        now = time.monotonic()
        for message in self._reader.consume(500, timeout=0):
            if message.error() is None:
                self._hear(message.value(), now)
        return self._reports.state(me, now)

    def _hear(self, value: bytes | None, now: float) -> None:
        try:
            report = orjson.loads(value or b"")
            if (report["topic"], report["group"]) != (self._topic, self._group):
                return
            slots = report.get("slots")
            holding = Holding(
                [int(p) for p in report["partitions"]],
                {int(p): int(n) for p, n in report["backlog"].items()},
                None if slots is None else int(slots),
            )
            self._reports.hear(str(report["member"]), holding, now)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.debug("%s: not a budget report: %r", self._group, value)

    def close(self) -> None:
        self._reader.close()


def _ignore_failure(sending: asyncio.Task[object]) -> None:
    """A report Kafka did not take is replaced by the next one a moment later."""
    if sending.cancelled():
        return
    error = sending.exception()
    if error is not None and not isinstance(error, ProduceFailed):
        log.warning("budget report failed: %r", error)


class GroupBudget:
    """Keeps one member's Limits at its share of the group's budget."""

    def __init__(
        self,
        config: Config,
        consumer: ConsumerConfig,
        member_id: Callable[[], str | None],
        holding: Callable[[], Holding],
        producer: Callable[[], Producer],
        limits: Limits,
        counters: GroupCounters,
    ) -> None:
        self._consumer = consumer
        self._member_id = member_id  # this member's id in the group; None until it joined
        self._holding = holding  # what this member holds now, for its report
        self._producer = producer  # the node's producer (a reload may replace it)
        self._limits = limits
        self._counters = counters  # shows the share in /stats and /metrics
        self._exchange = Exchange(config, consumer)
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
        self._exchange.close()

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
        self.assignment_changed()

    def assignment_changed(self) -> None:
        """Partitions came or went: refresh now rather than at the next tick."""
        self._changed.set()

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), REFRESH_SECONDS)
            self._changed.clear()
            try:
                self._refresh()
            except Exception:  # a bug here must not end the refreshes: the share would freeze
                log.exception("%s: budget refresh failed", self._name)

    def _refresh(self) -> None:
        me = self._member_id()
        if not me:  # not in the group yet: nothing to report, no share
            return
        holding = replace(self._holding(), slots=max(self.share.concurrency, self._limits.in_use))
        self._exchange.publish(self._producer(), me, holding)
        try:
            state = self._exchange.state(me)
        except KafkaException as exc:
            log.debug("%s: reports unreadable: %s", self._name, exc)
            return
        if state is not None:  # else unknown: the shares in force stay
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
        if share.concurrency > self.share.concurrency:
            room = config.concurrency - sum(
                state.slots.get(member, computed.get(member, NOTHING).concurrency)
                for member in state.assignment
                if member != me
            )
            share = Share(share.rate, max(self.share.concurrency, min(share.concurrency, room)))
        if share != self.share:
            log.debug("%s: share %s -> %s", self._name, self.share, share)
            self._enforce(share)

    def _enforce(self, share: Share) -> None:
        self.share = share
        self._limits.update(share.rate, share.concurrency)
        self._counters.budgetRate = share.rate if share.concurrency else 0.0
        self._counters.budgetConcurrency = share.concurrency
