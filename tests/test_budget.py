"""A group's rateLimit and concurrency hold for the whole group, across workers and nodes.

The unit tests pin how bigpipe.delivery.budget splits the budget; the end-to-end tests run real
nodes (1 node with 2 workers, 2 nodes with 2 workers each) against a real broker and
measure what the downstream sees.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bigpipe.calls.status import NO_TRAIL
from bigpipe.config import parse_config
from bigpipe.delivery.budget import (
    FLOOR_FRACTION,
    LIVE_SECONDS,
    NOTHING,
    GroupBudget,
    GroupState,
    Holding,
    Reports,
    Share,
    shares,
)
from bigpipe.delivery.client import DeliveryClient
from bigpipe.delivery.limits import Limits
from bigpipe.delivery.shields import DestinationShields
from bigpipe.metrics import Latencies
from bigpipe.stats import GroupCounters
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    group_settled,
    group_stats,
    key_for,
    unique,
)
from tests.test_config import EXAMPLE
from tests.test_destination_shields import group_config

RATE, CONCURRENCY = 40, 4
BACKLOG = (40, 120, 280)  # calls per partition: uneven, so members run dry one by one
EVEN_BACKLOG = (160, 160, 160)  # 12 s at 40/s
DOWNSTREAM_SECONDS = 0.05  # each call's time at the downstream: 2 in flight at 40/s


def total(split: dict[str, Share]) -> tuple[float, int]:
    """The rate and slots given out; a member with no slot sends nothing, whatever its rate."""
    slotted = [s for s in split.values() if s.concurrency]
    return sum(s.rate for s in slotted), sum(s.concurrency for s in slotted)


# ---------------------------------------------------------------- the split
def test_the_budget_goes_where_the_backlog_is() -> None:
    assignment = {"a": [0], "b": [1, 2], "c": []}
    split = shares(40, 3, assignment, {0: 0, 1: 5, 2: 7})
    assert split["c"] == Share(split["c"].rate, 0) and split["c"].rate < 0.01, "no partitions"
    assert split["a"].concurrency == 0, "3 slots < 2 x 2 holders: no floor slot"
    assert split["a"].rate < 0.01, "idle, no slot: no rate either"
    assert split["b"] == Share(pytest.approx(40), 3)
    assert total({m: split[m] for m in "ab"}) == (pytest.approx(40), 3)
    with_floor = shares(40, 4, assignment, {0: 0, 1: 5, 2: 7})
    assert with_floor["a"] == Share(pytest.approx(40 * FLOOR_FRACTION / 2), 1), "the floor"
    assert with_floor["b"] == Share(pytest.approx(40 - with_floor["a"].rate), 3)


def test_shares_follow_backlogged_partitions_and_add_up() -> None:
    assignment = {"a": [0], "b": [1], "c": [2, 3], "d": [4]}
    split = shares(40, 8, assignment, {0: 1, 1: 0, 2: 3, 3: 9, 4: 2})
    rates, slots = total(split)
    assert (rates, slots) == (pytest.approx(40), 8)
    assert split["b"].concurrency == 1, "8 slots >= 2 x 4 holders: the idle one keeps one"
    assert split["b"].rate == pytest.approx(40 * FLOOR_FRACTION / 4)
    assert split["c"].rate == pytest.approx(2 * split["a"].rate)
    assert split["c"].concurrency > split["a"].concurrency >= 1


def test_with_no_backlog_the_budget_is_split_by_partitions_held() -> None:
    split = shares(30, 3, {"a": [0, 1], "b": [2]}, {})
    assert split == {"a": Share(pytest.approx(20), 2), "b": Share(pytest.approx(10), 1)}


def test_every_busy_member_gets_a_slot_when_there_are_enough() -> None:
    """Largest remainder alone gave a member with 1 backlogged partition of 11 no slot."""
    split = shares(40, 4, {"a": list(range(10)), "b": [10]}, dict.fromkeys(range(11), 5))
    assert split["b"].concurrency == 1 and split["a"].concurrency == 3


def test_fewer_slots_than_busy_members_take_turns() -> None:
    assignment = {m: [n] for n, m in enumerate("abcde")}
    backlog = dict.fromkeys(range(5), 10)
    seen: dict[str, int] = {}
    for epoch in range(5):
        split = shares(10, 2, assignment, backlog, epoch)
        assert total(split) == (pytest.approx(10), 2)
        for member, share in split.items():
            seen[member] = seen.get(member, 0) + share.concurrency
            assert (share.concurrency == 0) == (share.rate < 0.01), "rate goes with the slot"
    assert seen == dict.fromkeys("abcde", 2), "each member holds a slot in 2 turns of 5"


def test_while_no_member_holds_a_partition_every_share_is_nothing() -> None:
    """A node restarted after kill -9 hears its own report before the group gives it the
    partitions the dead member held: that reckoning divided by zero holders, and the
    budget's task died, leaving the member with no slot for ever (a stall)."""
    assert shares(40, 4, {"new": []}, {}) == {"new": NOTHING}
    assert shares(40, 4, {}, {}) == {}


def test_every_member_works_out_the_same_split() -> None:
    assignment = {"m2": [2], "m0": [0], "m1": [1]}
    backlog = {0: 3, 1: 3, 2: 3}
    reordered = dict(reversed(list(assignment.items())))
    assert shares(40, 4, assignment, backlog) == shares(40, 4, reordered, backlog)
    slots = [shares(40, 4, assignment, backlog)[m].concurrency for m in ("m0", "m1", "m2")]
    assert slots == [2, 1, 1], "the leftover slot goes to the lowest member id"


# ---------------------------------------------------------------- end to end
class Budgeted:
    """Nodes of one group (rateLimit RATE, concurrency CONCURRENCY) and a downstream that
    takes DOWNSTREAM_SECONDS per call and logs every change of its in-flight count."""

    def __init__(self, kafka: str, workdir: Path, workers: int, processes: list[Bigpipe]) -> None:
        self.kafka, self.workdir, self.workers = kafka, workdir, workers
        self._processes = processes  # the fixture kills what a failed test leaves running
        self.topic, self.group = unique("calls"), unique("g")
        self.nodes: list[Bigpipe] = []
        self.backlog = BACKLOG
        self.in_flight: list[tuple[float, int]] = []  # (when, requests open from then on)
        self.downstream = Downstream(self._slow)

    async def _slow(self, _request: web.Request, _number: int) -> web.StreamResponse:
        self.in_flight.append((time.monotonic(), self.downstream.in_flight))
        try:
            await asyncio.sleep(DOWNSTREAM_SECONDS)
            return web.Response(status=200)
        finally:  # the Downstream counts this request out right after
            self.in_flight.append((time.monotonic(), self.downstream.in_flight - 1))

    async def add_node(self) -> None:
        entry = consumer_entry(
            self.topic, self.group, rateLimit=RATE, concurrency=CONCURRENCY, retries=0
        )
        config = base_config(self.kafka, self.topic, free_port(), consumers=[entry])
        node = Bigpipe(config, self.workdir, ("--workers", str(self.workers)))
        self._processes.append(node)  # before start: a node that never gets ready is killed too
        self.nodes.append(await node.start())

    async def wait_members(self) -> None:
        await group_settled(self.kafka, self.group, len(self.nodes) * self.workers, len(BACKLOG))

    async def shares_add_up(self) -> bool:
        """Do the nodes' shares in /stats add up to the budget? With no backlog, the
        budget is split over the members holding partitions: no floor, no rounding."""
        async with aiohttp.ClientSession() as http:
            shown = [await group_stats(node, http) for node in self.nodes]
        rate = sum(s["budgetRate"] for s in shown)
        slots = sum(s["budgetConcurrency"] for s in shown)
        return math.isclose(rate, RATE) and slots == CONCURRENCY

    async def load_backlog(self, backlog: tuple[int, ...] = BACKLOG) -> None:
        self.backlog = backlog
        async with aiohttp.ClientSession() as http:
            calls = [
                self.nodes[n % len(self.nodes)].post_call(
                    http, url=self.downstream.url(), partition_key=key_for(partition, 3)
                )
                for partition, count in enumerate(backlog)
                for n in range(count)
            ]
            answers = await asyncio.gather(*calls)
        assert all(status == 200 for status, _ in answers)

    async def wait_delivered(self) -> None:
        await eventually(
            lambda: len(self.downstream.answered_ids()) == sum(self.backlog),
            60,
            "every call delivered",
        )

    async def stop(self) -> None:
        await self.downstream.stop()
        for node in self.nodes:
            await node.stop()

    def figures(self) -> dict[str, float]:
        """The steady rate from the first request to the last, the most requests in any
        one second, the peak in flight, and how long in all it stood above CONCURRENCY."""
        times = sorted(r.at for r in self.downstream.requests)
        busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
        over = sum(
            later - when
            for (when, count), (later, _) in zip(self.in_flight, self.in_flight[1:], strict=False)
            if count > CONCURRENCY
        )
        return {
            "requests": len(times),
            "rate": round((len(times) - 1) / (times[-1] - times[0]), 2),
            "busiest second": busiest,
            "peak in flight": max(count for _, count in self.in_flight),
            "seconds over the cap": round(over, 3),
        }


@pytest.fixture(name="budgeted")
async def budgeted_run(
    kafka: str, tmp_path: Path, request: pytest.FixtureRequest, processes: list[Bigpipe]
) -> AsyncIterator[Budgeted]:
    run = Budgeted(kafka, tmp_path, request.param, processes)
    await run.downstream.start()
    yield run
    await run.stop()


@pytest.mark.parametrize("budgeted", [2], indirect=True)
async def test_one_node_keeps_the_group_budget(budgeted: Budgeted) -> None:
    """Before: 1 node of 2 workers delivered 26.6/s of 40 (one worker ran dry while the
    other was held at half the rate). Two nodes: tests/faults/test_budget_nodes.py."""
    await budgeted.add_node()
    await budgeted.wait_members()
    await eventually(budgeted.shares_add_up, 10, "the nodes' shares to make the budget")
    await budgeted.load_backlog()
    await budgeted.wait_delivered()
    measured = budgeted.figures()
    print(f"\nbudget, 1 node x 2 workers: {measured}")
    assert measured["requests"] == sum(BACKLOG), "each call once: no rebalance mid-run"
    # The 10 % holds on a quiet machine (tests/faults/test_budget_nodes.py checks
    # it); at load averages of 15 to 40 on two cores, 34-35/s was measured, so the normal
    # suite allows 20 %: still well above the 26.6/s of the static split.
    assert math.isclose(measured["rate"], RATE, rel_tol=0.20), measured
    assert measured["busiest second"] <= RATE * 1.2, measured
    assert measured["peak in flight"] <= CONCURRENCY, measured


def test_reports_tell_the_group_from_the_live_members_only() -> None:
    reports = Reports()
    assert reports.state("me", 0.0) is None, "before this member's own report came back"
    reports.hear("me", Holding([0, 1], {0: 5, 1: 0}), 0.0)
    reports.hear("other", Holding([2], {2: 3}), 0.5)
    state = reports.state("me", 1.0)
    assert state == GroupState(True, {"me": [0, 1], "other": [2]}, {0: 5, 1: 0, 2: 3})
    reports.hear("me", Holding([0, 1], {0: 4, 1: 0}), LIVE_SECONDS + 1)
    state = reports.state("me", LIVE_SECONDS + 1)
    assert state is not None and set(state.assignment) == {"me"}, "a silent member holds nothing"
    assert reports.state("me", 2 * LIVE_SECONDS + 2) is None, "own report gone: Kafka away"


def test_a_partition_two_members_claim_makes_the_state_unstable() -> None:
    reports = Reports()
    reports.hear("me", Holding([0, 1], {}), 0.0)
    reports.hear("other", Holding([1], {}), 0.0)
    state = reports.state("me", 0.0)
    assert state is not None and not state.stable


async def test_a_reload_lets_no_waiting_call_take_a_slot_beyond_the_members_share() -> None:
    """The budget owns the client's limits. DeliveryClient.update used to set the group's
    whole concurrency first: calls waiting for a slot took it at once, and kept it after
    the budget cut the limits back to this member's share."""
    config = group_config(concurrency=8)
    counters = GroupCounters()
    client = DeliveryClient(
        config,
        counters,
        DestinationShields("t/g", config, counters),
        lambda _name, _topic: None,
        Latencies().group("t", "g").attempt,
        NO_TRAIL,
    )
    try:
        client.limits.update(1000, 1)  # this member's share: one slot
        await client.limits.acquire()
        waiting = [asyncio.ensure_future(client.limits.acquire()) for _ in range(3)]
        client.update(config.model_copy(update={"concurrency": 16}))  # a reload
        done, _ = await asyncio.wait(waiting, timeout=0.5)
        assert not done, f"{len(done)} calls in flight beyond the member's one slot"
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        await client.close()


async def test_a_raise_takes_only_slots_no_other_member_holds_by_its_report() -> None:
    """Member b, busy, goes from 3 slots to 2 as a becomes busy and goes from 1 to 2. b
    sees its cut at its own next refresh, a report's way later, and its calls over the
    cut finish after that: a raising at once (or one refresh later, as it did) let the
    group run 5 calls at once under a cap of 4 (tests/faults/test_budget_nodes.py)."""
    budget = GroupBudget(
        parse_config({**EXAMPLE, "kafka.bootstrap.servers": f"127.0.0.1:{free_port()}"}),
        group_config(concurrency=4, rate_limit=40),
        member_id=lambda: "a",
        holding=lambda: Holding([], {}),
        producer=lambda: None,  # type: ignore[arg-type,return-value]
        limits=Limits(1.0, 0),
        counters=GroupCounters(),
    )
    assignment = {"a": [0], "b": [1, 2]}
    try:
        a_idle = GroupState(True, assignment, {0: 0, 1: 9, 2: 9}, {"a": 0, "b": 3})
        assert shares(40, 4, assignment, a_idle.backlog)["a"].concurrency == 1
        budget._apply(a_idle)
        assert budget.share.concurrency == 1
        both_busy = {0: 9, 1: 9, 2: 9}
        assert shares(40, 4, assignment, both_busy)["a"].concurrency == 2
        budget._apply(GroupState(True, assignment, both_busy, {"a": 1, "b": 3}))
        assert budget.share.concurrency == 1, "b holds 3 slots still: no room"
        budget._apply(GroupState(True, assignment, both_busy, {"a": 1, "b": 2}))
        assert budget.share.concurrency == 2, "b reports its cut: the slot is free"
        budget._apply(GroupState(True, assignment, both_busy, {"a": 2, "b": 2}))
        assert budget.share.concurrency == 2
    finally:
        await budget.stop()


async def test_a_member_reports_the_slots_it_still_holds_after_a_cut() -> None:
    limits = Limits(1000.0, 3)
    for _ in range(3):
        await limits.acquire()
    limits.update(1000.0, 1)  # cut to one slot with three calls open
    assert limits.in_use == 3
    limits.release()
    assert limits.in_use == 2
