"""The group's budget with the issue's bounds: 1 and 2 nodes of 2 workers, and a node
joining mid-backlog.

Four worker processes and a broker on two shared cores are too heavy for the normal
suite, so these are marked `long` (run them with `./build.sh faults -m long -k budget`);
tests/test_budget.py runs the 1-node case there. Under a load average of about 20
from other work, the 2-node rate measured 35/s instead of 37-39/s. Not yet explained;
a likely cause is that each member's token bucket holds about one token, so every
late wake-up of a starved event loop loses part of a token.
"""

from __future__ import annotations

import math

import aiohttp
import pytest

from tests.faults.conftest import Cluster
from tests.support import eventually, group_stats
from tests.test_budget import (
    BACKLOG,
    CONCURRENCY,
    EVEN_BACKLOG,
    RATE,
    Budgeted,
    budgeted_run,  # noqa: F401 (the fixture `budgeted`)
)

pytestmark = [pytest.mark.faults, pytest.mark.long, pytest.mark.timeout(300)]


@pytest.fixture
def kafka(cluster: Cluster) -> str:
    """The fault suite's own Kafka (./build.sh faults starts no test broker)."""
    return cluster.bootstrap


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("budgeted", [2], indirect=True)
async def test_nodes_keep_the_group_budget(budgeted: Budgeted, nodes: int) -> None:
    """The issue's bounds, 10 % on the rate. Before: 1 node of 2 workers delivered 26.6/s;
    2 nodes saw 63 calls in a second and 5 in flight (each had the budget)."""
    for _ in range(nodes):
        await budgeted.add_node()
    await budgeted.wait_members()
    await eventually(budgeted.shares_add_up, 10, "the nodes' shares to make the budget")
    await budgeted.load_backlog()
    await budgeted.wait_delivered()
    measured = budgeted.figures()
    print(f"\nbudget, {nodes} node(s) x 2 workers: {measured}")
    assert measured["requests"] == sum(BACKLOG), "each call once: no rebalance mid-run"
    assert math.isclose(measured["rate"], RATE, rel_tol=0.10), measured
    assert measured["busiest second"] <= RATE * 1.2, measured
    assert measured["peak in flight"] <= CONCURRENCY, measured


@pytest.mark.parametrize("budgeted", [2], indirect=True)
async def test_a_node_joining_mid_backlog_keeps_the_budget(budgeted: Budgeted) -> None:
    """A second node joins while the first delivers: partitions move (a rebalance), and
    the shares follow. What the downstream sees meanwhile is measured and bounded."""
    await budgeted.add_node()
    await budgeted.wait_members()
    await budgeted.load_backlog(EVEN_BACKLOG)  # the partitions that move still hold calls
    await budgeted.add_node()
    await budgeted.wait_members()
    rebalanced_at = len(budgeted.downstream.requests)
    await budgeted.wait_delivered()
    async with aiohttp.ClientSession() as http:
        joined = await group_stats(budgeted.nodes[1], http)
    measured = budgeted.figures()
    print(
        f"\nbudget, a node joins mid-backlog: {measured}; stable with 4 members after "
        f"{rebalanced_at} requests; the new node delivered {joined['rpcSuccess']}"
    )
    assert joined["rpcSuccess"] > 0, "the new node took partitions while backlog remained"
    assert measured["busiest second"] <= RATE * 1.2, measured
    assert measured["peak in flight"] <= 2 * CONCURRENCY, measured
    assert measured["seconds over the cap"] < 1.0, measured
