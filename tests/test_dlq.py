"""`bigpipe dlq`: list and redrive dead letters, each back to its own group only.

Two groups share one call topic, so every call fails twice: 25 calls make 50 dead
letters. A redrive of one group's selection must reach that group only (the
other reads the records and skips them), keep the ids, count the redrive, and
write nothing the second time. A redrive killed with SIGKILL midway loses nothing:
the next run sends what the first had not recorded as sent.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.support import (
    REPO,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    topic_record_count,
    unique,
)

CALLS = 25
TO_A = 13  # of the 25 calls, those to /a; the rest go to /b


@dataclass
class Failing:
    """A downstream that answers 500 until told to recover."""

    failing: bool = True

    async def __call__(self, _request: web.Request, _number: int) -> web.StreamResponse:
        return web.Response(
            status=500 if self.failing else 200, text="boom" if self.failing else ""
        )


@pytest.fixture
async def failing() -> AsyncIterator[tuple[Failing, Downstream]]:
    behaviour = Failing()
    downstream = await Downstream(behaviour).start()
    yield behaviour, downstream
    await downstream.stop()


@dataclass
class Setup:
    bigpipe: Bigpipe
    topic: str
    groups: tuple[str, str]
    ids_to: dict[str, set[str]]  # path -> call ids


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bigpipe",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def group_counters(bigpipe: Bigpipe, http: aiohttp.ClientSession) -> dict[str, dict]:
    return {g["groupId"]: g for g in (await bigpipe.stats(http))["consumerStats"]}


async def fifty_dead_letters(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    **node: Any,
) -> Setup:
    topic, groups = unique("calls"), (unique("g1"), unique("g2"))
    entries = [consumer_entry(topic, g, retries=0) for g in groups]
    config = base_config(kafka, topic, free_port(), consumers=entries, **node)
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    ids_to: dict[str, set[str]] = {"/a": set(), "/b": set()}
    for n in range(CALLS):
        path = "/a" if n < TO_A else "/b"
        status, reply = await bigpipe.post_call(
            http, f"call {n}", downstream.url(path), partition_key=f"k{n}"
        )
        assert (status, reply["errno"]) == (200, 0), reply
        ids_to[path].add(reply["data"]["id"])

    async def all_dead() -> bool:
        counters = await group_counters(bigpipe, http)
        return all(counters[g]["deadLetter"] == CALLS for g in groups)

    await eventually(all_dead, 60, "25 dead letters in each group")
    return Setup(bigpipe, topic, groups, ids_to)


async def test_redrive_sends_one_groups_selection_to_that_group_only_once(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    failing: tuple[Failing, Downstream],
) -> None:
    behaviour, downstream = failing
    setup = await fifty_dead_letters(kafka, downstream, http, tmp_path, processes)
    g1, g2 = setup.groups
    config = str(setup.bigpipe.config_path)
    code, out, _ = await run_cli("dlq", "list", "-config", config, "--json")
    assert code == 0 and len(out.splitlines()) == 2 * CALLS
    selection = ["--group", g1, "--url-prefix", downstream.url("/a")]
    code, out, err = await run_cli("dlq", "list", "-config", config, *selection, "--json")
    listed = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0, err
    assert {row["id"] for row in listed} == setup.ids_to["/a"]
    assert {row["group"] for row in listed} == {g1}
    assert {row["lastStatus"] for row in listed} == {500}

    behaviour.failing = False
    downstream.requests.clear()
    before = await group_counters(setup.bigpipe, http)
    code, out, err = await run_cli("dlq", "redrive", "-config", config, *selection, "--json")
    assert code == 0, err
    assert orjson.loads(out)["redriven"] == TO_A

    async def both_groups_read_them() -> bool:
        now = await group_counters(setup.bigpipe, http)
        return (
            all(now[g]["handleMessage"] == before[g]["handleMessage"] + TO_A for g in (g1, g2))
            and now[g1]["rpcSuccess"] == before[g1]["rpcSuccess"] + TO_A
        )

    await eventually(both_groups_read_them, 60, "both groups to read the redriven calls")
    after = await group_counters(setup.bigpipe, http)
    assert after[g2]["rpcTotal"] == before[g2]["rpcTotal"], "the other group skips them"
    assert sorted(r.call_id for r in downstream.requests) == sorted(setup.ids_to["/a"])
    assert {r.headers.get("X-Bigpipe-Redrive") for r in downstream.requests} == {"1"}

    written = topic_record_count(kafka, setup.topic)
    code, out, err = await run_cli("dlq", "redrive", "-config", config, *selection, "--json")
    summary = orjson.loads(out)
    assert code == 0, err
    assert (summary["redriven"], summary["alreadyRedriven"]) == (0, TO_A)
    assert topic_record_count(kafka, setup.topic) == written, "a second run sends nothing"


async def test_a_redrive_killed_midway_loses_nothing(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    failing: tuple[Failing, Downstream],
) -> None:
    behaviour, downstream = failing
    setup = await fifty_dead_letters(kafka, downstream, http, tmp_path, processes)
    g1, g2 = setup.groups
    behaviour.failing = False
    downstream.requests.clear()
    before = await group_counters(setup.bigpipe, http)
    command = ["dlq", "redrive", "-config", str(setup.bigpipe.config_path), "--group", g2]
    # 5 calls a second, in batches of 5: the kill comes after the first batch or two.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bigpipe",
        *command,
        "--rate",
        "5",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    first = await asyncio.wait_for(process.stderr.readline(), 60)
    assert first.startswith(b"redriven 5/25"), first
    process.send_signal(signal.SIGKILL)
    await process.wait()
    code, out, err = await run_cli(*command, "--json")
    summary = orjson.loads(out)
    assert code == 0, err
    assert (
        summary["alreadyRedriven"] >= 5
        and summary["redriven"] + summary["alreadyRedriven"] == CALLS
    )
    every_id = setup.ids_to["/a"] | setup.ids_to["/b"]
    await eventually(
        lambda: downstream.call_ids() == every_id, 60, "every one of g2's calls once more"
    )
    after = await group_counters(setup.bigpipe, http)
    assert after[g1]["rpcTotal"] == before[g1]["rpcTotal"], "none of them went to g1"


ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


async def test_admin_endpoints_need_the_token_and_take_the_same_filters(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    failing: tuple[Failing, Downstream],
) -> None:
    _, downstream = failing
    setup = await fifty_dead_letters(
        kafka, downstream, http, tmp_path, processes, **{"http.admin.token": ADMIN_TOKEN}
    )
    g1, _ = setup.groups
    url = f"{setup.bigpipe.url}/admin/dlq"
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
        async with http.get(url, headers=header) as response:
            assert response.status == 401, header
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(url, headers=auth) as response:
        assert (await response.json())["data"]["count"] == 2 * CALLS
    query = {"group": g1, "url_prefix": downstream.url("/a"), "status": "500"}
    async with http.get(url, headers=auth, params=query) as response:
        rows = (await response.json())["data"]["deadLetters"]
    assert {row["id"] for row in rows} == setup.ids_to["/a"]
    some_id = rows[0]["id"]
    async with http.get(f"{url}/show", headers=auth, params={"id": some_id}) as response:
        shown = (await response.json())["data"]["deadLetters"]
    assert sorted(letter["source"]["group"] for letter in shown) == sorted(setup.groups)
    async with http.post(
        f"{url}/redrive", headers=auth, params={**query, "dry_run": "1"}
    ) as response:
        summary = (await response.json())["data"]
    assert (summary["redriven"], summary["dryRun"]) == (TO_A, True)
    async with http.get(url, headers=auth, params={"since": "yesterday"}) as response:
        assert response.status == 400
    assert ADMIN_TOKEN not in setup.bigpipe.log_tail(1000)


async def test_admin_endpoints_are_off_without_a_token(
    kafka: str, tmp_path: Path, http: aiohttp.ClientSession, processes: list[Bigpipe]
) -> None:
    topic = unique("calls")
    bigpipe = await Bigpipe(base_config(kafka, topic, free_port()), tmp_path).start()
    processes.append(bigpipe)
    auth = {"Authorization": "Bearer anything-at-all-0123456789"}
    async with http.get(f"{bigpipe.url}/admin/dlq", headers=auth) as response:
        assert response.status == 404
