"""A call you can follow: its steps in the results topic, its status from any node."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bigpipe.calls.status import status_of
from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    REPO,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    dead_letter_topic,
    eventually,
    free_port,
    process_name,
    read_topic,
    read_whole_topic,
    start_node,
    unique,
)
from tests.test_workers import children


async def fail_twice(_request: web.Request, number: int) -> web.Response:
    if number < 2:
        return web.Response(status=503, text="busy", headers={"Retry-After": "0"})
    return web.Response(status=204)


async def test_each_step_of_a_call_is_written_to_the_results_topic(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = fail_twice
    results = unique("results")
    bigpipe, topic = await start_node(
        kafka, tmp_path, processes, node={"status.topic": results}, retries=3
    )
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    _, reply = await bigpipe.post_call(http, "x", downstream.url())
    call_id = reply["data"]["id"]
    await eventually(lambda: len(downstream.requests) == 3, 30, "three attempts")

    def steps() -> list[dict[str, Any]]:
        messages = read_whole_topic(kafka, results)
        assert {m.key() for m in messages} == {call_id.encode()}
        return [orjson.loads(m.value()) for m in messages]

    records: list[dict[str, Any]] = []

    async def attempts_written() -> bool:
        records[:] = await asyncio.to_thread(steps)
        return [r["e"] for r in records].count("attempt") == 3

    await eventually(attempts_written, 30, "three attempt steps in the results topic")
    kinds = [r["e"] for r in records]
    # in_flight only for an attempt still open after a tick: none of these, on a quiet machine
    assert kinds.count("queued") == 1 and kinds.count("in_flight") <= 3
    status = status_of(call_id, records)
    assert status is not None
    assert status["topic"] == topic
    mine = status["groups"][group]
    assert mine["state"] == "delivered"
    assert [a["status"] for a in mine["attempts"]] == [503, 503, 204]
    assert [a["attempt"] for a in mine["attempts"]] == [1, 2, 3]
    assert mine["attempts"][0]["retry_after"] == 0
    assert mine["outcome"]["result"] == "delivered"
    assert all(r["caller"] == "system-1" for r in records)


# ---------------------------------------------------------------- GET /rpc/call/{id}
OTHER = ("other-caller", "another-secret")


def two_callers(kafka: str, topic: str, **overrides: object) -> dict[str, object]:
    """A node's config with a group on `topic`, and a second caller writing to it."""
    config = base_config(
        kafka,
        topic,
        free_port(),
        consumers=[consumer_entry(topic, unique("g"), **overrides)],
        **{"status.topic": unique("results")},
    )
    config["kafka.producer.acl"].append({"name": OTHER[0], "secret": OTHER[1], "topic": topic})
    return config


async def call_status(
    bigpipe: Bigpipe,
    http: aiohttp.ClientSession,
    call_id: str,
    auth: tuple[str, str] | None = (ACL_NAME, ACL_SECRET),
) -> tuple[int, dict[str, Any]]:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    async with http.get(f"{bigpipe.url}/rpc/call/{call_id}", headers=headers) as response:
        return response.status, await response.json()


async def state_of(bigpipe: Bigpipe, http: aiohttp.ClientSession, call_id: str) -> str | None:
    status, reply = await call_status(bigpipe, http, call_id)
    if status != 200:
        return None
    (group,) = reply["data"]["groups"].values()
    return group["state"]


async def test_a_calls_state_moves_from_queued_through_waiting_to_delivered(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    """One slot: a first call holds it (B is queued), B's first attempt is held open (in
    flight), answers 503 with Retry-After 2 (waiting, with its due), then 204 (delivered)."""
    release_first, release_attempt = asyncio.Event(), asyncio.Event()

    async def behaviour(request: web.Request, number: int) -> web.Response:
        if request.path == "/first":
            await release_first.wait()
            return web.Response(status=204)
        if number == 1:  # B's first attempt
            await release_attempt.wait()
            return web.Response(status=503, text="later", headers={"Retry-After": "2"})
        return web.Response(status=204)

    downstream.behaviour = behaviour
    topic = unique("calls")
    config = two_callers(kafka, topic, concurrency=1, retries=2, backoffBase=2000, backoffMax=2000)
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    _, first = await bigpipe.post_call(http, "a", downstream.url("/first"))
    await eventually(lambda: len(downstream.requests) == 1, 30, "the first call to hold the slot")
    _, reply = await bigpipe.post_call(http, "b", downstream.url("/b"))
    call_id = reply["data"]["id"]
    seen: list[str | None] = []

    async def reaches(state: str) -> bool:
        seen.append(await state_of(bigpipe, http, call_id))
        return seen[-1] == state

    await eventually(lambda: reaches("queued"), 30, "B queued behind the first call")
    # (its steps may be on another partition of the results topic, read a moment later)
    await eventually(
        lambda: _is(state_of(bigpipe, http, first["data"]["id"]), "in_flight"),
        30,
        "the first call in flight",
    )
    release_first.set()
    await eventually(lambda: reaches("in_flight"), 30, "B in flight")
    release_attempt.set()
    await eventually(lambda: reaches("waiting"), 30, "B waiting for its retry")
    _, waiting = await call_status(bigpipe, http, call_id)
    (group,) = waiting["data"]["groups"].values()
    assert group["due"] > group["attempts"][0]["at"]
    await eventually(lambda: reaches("delivered"), 30, "B delivered")
    _, done = await call_status(bigpipe, http, call_id)
    assert done["errno"] == 0
    data = done["data"]
    assert data["id"] == call_id and data["topic"] == topic
    (group,) = data["groups"].values()
    assert [(a["attempt"], a["status"], a["retry_after"]) for a in group["attempts"]] == [
        (1, 503, 2),
        (2, 204, None),
    ]
    assert group["attempts"][0]["error"] == "HTTP 503: later"
    assert all(a["latency_ms"] >= 0 for a in group["attempts"])
    assert group["outcome"]["result"] == "delivered"
    order = [s for i, s in enumerate(seen) if s is not None and (i == 0 or seen[i - 1] != s)]
    assert order == ["queued", "in_flight", "waiting", "delivered"]


async def test_a_dead_call_says_where_its_dead_letter_is(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    downstream.behaviour = always_500
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, node={"status.topic": unique("results")}, retries=1
    )
    _, reply = await bigpipe.post_call(http, "x", downstream.url())
    call_id = reply["data"]["id"]
    await eventually(
        lambda: _is(state_of(bigpipe, http, call_id), "dead"), 30, "the call dead-lettered"
    )
    _, dead = await call_status(bigpipe, http, call_id)
    (group,) = dead["data"]["groups"].values()
    assert [a["status"] for a in group["attempts"]] == [500, 500]
    assert group["outcome"]["error"] == "HTTP 500: boom"
    where = group["outcome"]["deadLetter"]
    assert where["topic"] == dead_letter_topic(bigpipe)
    (letter,) = await asyncio.to_thread(read_topic, kafka, where["topic"], 1)
    assert (letter.partition(), letter.offset()) == (where["partition"], where["offset"])
    assert orjson.loads(letter.value())["call"]["id"] == call_id

    # bigpipe status: a table for people, --json for scripts, exit codes that mean something
    code, table = await status_command(call_id, "--node", bigpipe.url)
    assert code == 0
    assert f"call      {call_id}" in table
    assert "dead at " in table and f"dead letter in {where['topic']} at " in table
    assert table.count(" 500 ") == 2 and "HTTP 500: boom" in table
    code, printed = await status_command(call_id, "--node", bigpipe.url, "--json")
    assert (code, orjson.loads(printed)) == (0, dead["data"])
    assert (await status_command("0" * 32, "--node", bigpipe.url))[0] == 1
    assert (await status_command(call_id, "--node", "127.0.0.1:1"))[0] == 1
    assert (await status_command(call_id, "--node", bigpipe.url, secret="wrong"))[0] == 2
    assert (await status_command(call_id, "--node", bigpipe.url, secret=None))[0] == 2


async def status_command(*args: str, secret: str | None = ACL_SECRET) -> tuple[int, str]:
    """Run `bigpipe status` as ACL_NAME, the secret in the environment; its exit code and stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIGPIPE_")}
    env["BIGPIPE_NAME"] = ACL_NAME
    if secret is not None:
        env["BIGPIPE_SECRET"] = secret
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bigpipe",
        "status",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0 or err.startswith(b"bigpipe"), err  # one line, no traceback
    return process.returncode, out.decode()


async def always_500(_request: web.Request, _number: int) -> web.Response:
    return web.Response(status=500, text="boom")


async def _is(state: Any, wanted: object) -> bool:
    return await state == wanted


async def test_any_node_answers_even_after_both_restart_and_only_to_its_caller(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    topic = unique("calls")
    config = two_callers(kafka, topic)
    first = await Bigpipe(config, tmp_path).start()
    processes.append(first)
    _, reply = await first.post_call(http, "x", downstream.url())
    call_id = reply["data"]["id"]
    await eventually(lambda: _is(state_of(first, http, call_id), "delivered"), 30, "delivered")
    # A second node that never saw the call: no group, another view file, the same topic.
    second_config = {**config, "http.server.port": free_port(), "kafka.consumer.list": []}
    second = await Bigpipe(second_config, tmp_path).start()
    processes.append(second)
    _, expected = await call_status(first, http, call_id)

    async def answers_as_expected(node: Bigpipe) -> None:
        await eventually(
            lambda: _is(state_of(node, http, call_id), "delivered"), 30, f"{node.url} to answer"
        )
        assert await call_status(node, http, call_id) == (200, expected)
        # another caller, a wrong secret, no credentials, an unknown id
        status, reply = await call_status(node, http, call_id, OTHER)
        assert (status, reply["errno"]) == (404, -1)
        status, reply = await call_status(node, http, call_id, (ACL_NAME, "wrong"))
        assert (status, reply["errno"], reply["msg"]) == (
            401,
            -1,
            "acl refused: unknown name or wrong secret",
        )
        status, reply = await call_status(node, http, call_id, None)
        assert (status, reply["errno"]) == (401, -1)
        assert "HTTP Basic" in reply["msg"]
        status, reply = await call_status(node, http, "0" * 32)
        assert (status, reply["errno"]) == (404, -1)

    await answers_as_expected(first)
    await answers_as_expected(second)

    async def caught_up() -> bool:
        async with http.get(f"{second.url}/metrics") as response:
            return "\nbigpipe_status_view_lag 0.0\n" in await response.text()

    await eventually(caught_up, 30, "the second node's view lag at 0 in /metrics")
    assert (await second.stats(http))["statusStats"]["viewLag"] == 0
    await asyncio.gather(first.stop(), second.stop())
    await asyncio.gather(first.start(), second.start())
    await answers_as_expected(first)
    await answers_as_expected(second)


def test_the_status_does_not_depend_on_the_order_steps_arrive_in() -> None:
    """The queued step comes from the accepting node, the others from the delivering one,
    through other producers and clocks: either may land first in the topic."""
    queued = {"e": "queued", "caller": "c", "at": 100, "topic": "t", "groups": ["G", "H"]}
    steps = [
        {"e": "in_flight", "caller": "c", "at": 90, "group": "G", "attempt": 1},
        {"e": "attempt", "caller": "c", "at": 95, "group": "G", "attempt": 1, "status": 204},
        {
            "e": "dead",
            "caller": "c",
            "at": 99,
            "group": "H",
            "reason": "expired",
            "deadLetter": {"topic": "t.H.dlq", "partition": 0, "offset": 7},
        },
    ]
    first = status_of("id", [queued, *steps])
    assert first == status_of("id", [*reversed(steps), queued])
    assert first is not None
    assert first["accepted"] == 100
    assert first["groups"]["G"]["state"] == "delivered"
    expired = first["groups"]["H"]
    assert (expired["state"], expired["attempts"]) == ("expired", [])
    assert expired["outcome"]["deadLetter"] == {"topic": "t.H.dlq", "partition": 0, "offset": 7}
    assert status_of("id", []) is None


async def test_every_worker_of_a_node_answers_from_the_one_view(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    downstream: Downstream,
) -> None:
    """Worker 0 builds the view; the kernel may hand a lookup to any worker."""
    bigpipe, _ = await start_node(
        kafka,
        tmp_path,
        processes,
        node={"status.topic": unique("results"), "http.server.workers": 2},
    )
    async with aiohttp.ClientSession() as http:
        _, reply = await bigpipe.post_call(http, "x", downstream.url())
    call_id = reply["data"]["id"]
    answers: list[int] = []

    async def on_a_new_connection() -> bool:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            status, body = await call_status(bigpipe, http, call_id)
        answers.append(status)
        return status == 200 and body["data"]["groups"] != {}

    await eventually(on_a_new_connection, 30, "the call's status")
    for _ in range(20):  # fresh connections, spread over both workers by SO_REUSEPORT
        assert await on_a_new_connection(), answers


def view_builders(pid: int) -> list[int]:
    """The status view builders (bigpipe.calls.view_builder) `pid` started."""
    return list(children(pid, view_builders=True))


def open_pipes(pid: int) -> int:
    """How many pipes `pid` holds open."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:"))


async def test_the_view_builder_is_started_again_if_it_dies_and_dies_with_its_node(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    """The view is built by a process of its own: killed, the node starts another, which
    carries on from the file; the node killed with -9 takes it down too."""
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, node={"status.topic": unique("results")}
    )
    assert bigpipe.process is not None
    node = bigpipe.process.pid

    async def view_lag() -> int:
        return int((await bigpipe.stats(http))["statusStats"]["viewLag"])

    async def delivered_and_caught_up(data: str) -> None:
        _, reply = await bigpipe.post_call(http, data, downstream.url())
        call_id = reply["data"]["id"]
        await eventually(
            lambda: _is(state_of(bigpipe, http, call_id), "delivered"), 30, f"{data} delivered"
        )
        await eventually(lambda: _is(view_lag(), 0), 30, "the builder's lag, caught up")

    await delivered_and_caught_up("before")
    (first,) = view_builders(node)
    pipes = open_pipes(node)
    os.kill(first, signal.SIGKILL)
    # the builder is started again 5 s later; meanwhile nobody knows the lag
    await eventually(lambda: _is(view_lag(), -1), 5, "viewLag -1 while no builder runs")
    await eventually(lambda: view_builders(node) not in ([], [first]), 30, "a new view builder")
    await delivered_and_caught_up("after")
    (second,) = view_builders(node)
    assert open_pipes(node) == pipes, "the dead builder's pipes are closed"
    # named apart from the node's `bigpipe`, which `killall -USR1 bigpipe` reloads
    await eventually(lambda: process_name(second) == "bigpipe-view", 10, "the builder's name")
    os.kill(node, signal.SIGKILL)
    await eventually(lambda: not Path(f"/proc/{second}").exists(), 30, "the builder gone")


def test_the_view_builder_stops_on_a_flood_of_sigterms(tmp_path: Path) -> None:
    """A worker's SIGTERM and the kernel's (PR_SET_PDEATHSIG) can come together. A handler
    that set the stop event re-entered itself, or the event's own wait, and deadlocked on
    the event's lock: a builder outlived its worker, for good, in a full test run."""
    settings = {
        "level": 40,
        "kafka": {"bootstrap.servers": f"127.0.0.1:{free_port()}"},  # nothing there: it waits
        "topic": "t",
        "path": str(tmp_path / "view.sqlite3"),
        "retention_ms": 3_600_000,
    }
    builder = subprocess.Popen(
        [sys.executable, "-P", "-m", "bigpipe.calls.view_builder"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        assert builder.stdin is not None
        builder.stdin.write(orjson.dumps(settings) + b"\n")
        builder.stdin.flush()  # kept open: only the signals may stop it
        # Its file made, it waits for the topic (no broker answers), its SIGTERMs taken.
        made = time.monotonic() + 30
        while not Path(settings["path"]).exists():
            assert time.monotonic() < made, "the builder never made its file"
            time.sleep(0.05)
        deadline = time.monotonic() + 2.0
        while builder.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(builder.pid, signal.SIGTERM)
        assert builder.wait(timeout=10) == 0
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait()
