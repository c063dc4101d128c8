"""SIGUSR1 hot reload on a live node: under load, with bad files, adding and removing groups."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bigpipe.config import parse_config
from bigpipe.node.app import Node
from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    Downstream,
    Received,
    answer_200,
    base_config,
    eventually,
    free_port,
    group_stats,
    own_kafka,
    reload,
    rewrite,
    start_node,
    unique,
)
from tests.test_status import call_status


async def post_as(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, name: str, secret: str, url: str
) -> tuple[int, dict[str, Any]]:
    body = {"acl": {"name": name, "secret": secret}, "url": url, "data": name}
    return await bigpipe.post_raw(http, orjson.dumps(body))


async def test_process_name_is_bigpipe_so_killall_reaches_it(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    assert bigpipe.process is not None
    comm = await asyncio.to_thread(Path(f"/proc/{bigpipe.process.pid}/comm").read_text)
    assert comm.strip() == "bigpipe"


async def test_ten_reloads_under_load_refuse_nothing_lose_nothing_and_never_rebalance(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes, concurrency=5)
    accepted: list[str] = []
    refused: list[dict[str, Any]] = []
    running = True

    async def steady_load() -> None:
        while running:
            _, reply = await bigpipe.post_call(http, url=downstream.url())
            if reply["errno"] == 0:
                accepted.append(reply["data"]["id"])
            else:
                refused.append(reply)

    load = [asyncio.create_task(steady_load()) for _ in range(8)]
    previous_caller = None
    last_accepted = 0
    for round_number in range(10):
        caller = {"name": f"temp-{round_number}", "secret": f"pw-{round_number}", "topic": topic}
        entry = {
            **bigpipe.config["kafka.consumer.list"][0],
            "rateLimit": 500 + 100 * round_number,
            "concurrency": 3 + round_number,
            "retries": round_number % 3,
            "timeout": 1000 + round_number,
        }
        rewrite(
            bigpipe,
            **{
                "kafka.producer.acl": [bigpipe.config["kafka.producer.acl"][0], caller],
                "kafka.consumer.list": [entry],
            },
        )
        await eventually(
            lambda wanted=100 * (round_number + 1): len(accepted) >= wanted,
            30,
            "a hundred calls under the running config",
        )
        await reload(bigpipe, http)
        status, _ = await post_as(bigpipe, http, caller["name"], caller["secret"], downstream.url())
        assert status == 200, "a caller added by the reload is accepted on the next request"
        if previous_caller is not None:
            status, _ = await post_as(
                bigpipe, http, previous_caller["name"], previous_caller["secret"], downstream.url()
            )
            assert status == 403, "a caller removed by the reload is refused"
        previous_caller = caller
        served = (await bigpipe.stats(http))["serverStats"]["acceptedCall"]
        assert served > last_accepted, "counters survive reloads and keep counting"
        last_accepted = served

    running = False
    await asyncio.gather(*load)
    assert refused == [], "not one valid call may be refused during reloads"
    await eventually(
        lambda: set(accepted) <= downstream.call_ids(), 60, "every accepted call to be delivered"
    )
    log = bigpipe.log_tail(10_000)
    print(
        f"\nreload: 10 reloads, accepted={len(accepted)} refused=0 "
        f"assignments={log.count('assigned partitions')}"
    )
    assert log.count("assigned partitions") == 1, "limits-only reloads must not rebalance"
    assert "revoked partitions" not in log


async def test_a_bad_file_is_rejected_whole_and_the_old_config_keeps_running(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    good = dict(bigpipe.config)
    entry = {**good["kafka.consumer.list"][0], "concurrency": 0}
    rewrite(bigpipe, **{"kafka.consumer.list": [entry], "kafka.producer.acl": []})
    await reload(bigpipe, http, ok=False)
    status, reply = await bigpipe.post_call(http, url=downstream.url())
    assert (status, reply["errno"]) == (200, 0), "the old ACLs still hold"
    await logged(
        bigpipe, "reload rejected, old config kept: kafka.consumer.list[0].concurrency: must be > 0"
    )

    rewrite(bigpipe, **{**good, "http.server.body.limit": 1234})
    await reload(bigpipe, http)
    await logged(bigpipe, "http.server.body.limit changed; it takes effect after a restart")


async def logged(bigpipe: Bigpipe, line: str) -> None:
    """Logs reach the file from a writer thread, a moment after the fact they record."""
    await eventually(lambda: line in bigpipe.log_tail(500), 5, f"the log line {line!r}")


async def test_groups_and_topics_can_be_added_and_removed(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes)
    first_group = bigpipe.config["kafka.consumer.list"][0]
    await eventually(
        lambda: "assigned partitions" in bigpipe.log_tail(), 30, "the first group to join"
    )
    new_topic = unique("added")
    second_group = {**first_group, "topic": new_topic, "groupId": unique("g2")}
    rewrite(
        bigpipe,
        **{
            "kafka.topics": [*bigpipe.config["kafka.topics"], {"name": new_topic, "partitions": 2}],
            "kafka.producer.acl": [{"name": ACL_NAME, "secret": ACL_SECRET, "topic": new_topic}],
            "kafka.consumer.list": [second_group],
        },
    )
    await reload(bigpipe, http)
    status, reply = await bigpipe.post_call(http, url=downstream.url())
    assert (status, reply["errno"]) == (200, 0), "the ACL now writes to the new topic"
    await eventually(
        lambda: reply["data"]["id"] in downstream.call_ids(),
        30,
        "the new group on the new topic to deliver",
    )
    stats = await bigpipe.stats(http)
    assert [(c["topic"], c["groupId"]) for c in stats["consumerStats"]] == [
        (new_topic, second_group["groupId"])
    ]
    await logged(bigpipe, f"{topic}/{first_group['groupId']}: revoked partitions")  # it left


async def by_path(request: web.Request, _number: int) -> web.Response:
    """/slow answers in 0.3 s, /slower in 1.5 s, /fail with 500, anything else at once."""
    delay = {"/slow": 0.3, "/slower": 1.5}.get(request.path, 0)
    await asyncio.sleep(delay)
    return web.Response(status=500 if request.path == "/fail" else 200)


async def test_each_reloaded_consumer_setting_is_seen_at_the_downstream(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=by_path).start()
    before = {"rateLimit": 5, "concurrency": 2, "retries": 0, "timeout": 5000}
    bigpipe, _ = await start_node(kafka, tmp_path, processes, **before)

    sent: list[str] = []

    async def send(path: str, count: int = 1) -> list[str]:
        """`count` calls at once: what reaches the downstream is paced by Bigpipe alone."""
        replies = await asyncio.gather(
            *(bigpipe.post_call(http, url=downstream.url(path)) for _ in range(count))
        )
        assert {(status, reply["errno"]) for status, reply in replies} == {(200, 0)}
        ids = [reply["data"]["id"] for _, reply in replies]
        sent.extend(ids)
        return ids

    def attempts(call_id: str) -> list[Received]:
        return [r for r in downstream.requests if r.call_id == call_id]

    async def finished() -> None:
        """Wait until every call sent has finished: delivered, or dead-lettered."""

        async def all_done() -> bool:
            return (await group_stats(bigpipe, http))["rpcTotal"] == len(sent)

        await eventually(all_done, 30, f"all {len(sent)} calls to finish")

    async def under_current_settings() -> dict[str, Any]:
        """The rate, the concurrency peak, the attempts on a failure and a 1.5 s answer."""
        rated = await send("/rate", 10)
        await finished()
        arrivals = sorted(attempts(i)[0].at for i in rated)
        downstream.peak_in_flight = 0
        await send("/slow", 12)
        await finished()
        failing = await send("/fail")
        slower = await send("/slower")
        await finished()
        return {
            "rate span": arrivals[-1] - arrivals[0],
            "concurrency peak": downstream.peak_in_flight,
            "attempts on 500": len(attempts(failing[0])),
            "1.5 s answer": [bool(r.answered) for r in attempts(slower[0])],
        }

    old = await under_current_settings()
    after = {"rateLimit": 1000, "concurrency": 6, "retries": 2, "timeout": 500}
    rewrite(
        bigpipe, **{"kafka.consumer.list": [{**bigpipe.config["kafka.consumer.list"][0], **after}]}
    )
    await reload(bigpipe, http)
    new = await under_current_settings()
    print(f"\nreloaded consumer settings at the downstream: before {old}, after {new}")
    # 10 calls at 5/s, with a bucket of one token, take 1.8 s; at 1000/s, a moment.
    assert old["rate span"] > 1.2 and new["rate span"] < 0.6, "rateLimit"
    assert (old["concurrency peak"], new["concurrency peak"]) == (2, 6), "concurrency"
    assert (old["attempts on 500"], new["attempts on 500"]) == (1, 3), "retries"
    assert old["1.5 s answer"] == [True], "a 5 s timeout waits for the 1.5 s answer"
    assert new["1.5 s answer"] == [False] * 3, "a 0.5 s timeout cuts off each attempt"
    await downstream.stop()


async def test_log_format_and_directory_reload(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    rewrite(bigpipe, **{"log.format": "json"})
    await reload(bigpipe, http)

    def json_lines(text: str) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]

    # The reload's own closing line is written under the new format.
    await eventually(
        lambda: any("reloaded" in e["message"] for e in json_lines(bigpipe.log_tail(50))),
        10,
        "a JSON log line after the reload",
    )
    assert {"time", "level", "logger", "message"} <= json_lines(bigpipe.log_tail(50))[-1].keys()

    directory = tmp_path / "logs"
    directory.mkdir()
    rewrite(bigpipe, **{"log.directory": str(directory)})
    lines_before = len(bigpipe.log_tail(10_000).splitlines())
    await reload(bigpipe, http)
    # Lines may still come to stderr while the reload runs (say, the group's assignment,
    # late on a busy machine); none made after it counted itself done.
    switched = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def in_directory() -> str:
        return "".join(f.read_text() for f in directory.glob("bigpipe.*.log"))

    await eventually(lambda: "reloaded" in in_directory(), 10, "log lines in log.directory")
    [log_file] = directory.glob("bigpipe.*.log")
    assert re.fullmatch(r"bigpipe\.\d{8}_\d{2}\.log", log_file.name)
    assert json_lines(in_directory()), "the format holds in the new place"
    after = json_lines("\n".join(bigpipe.log_tail(10_000).splitlines()[lines_before:]))
    assert [e for e in after if e["time"] > switched or "reloaded" in e["message"]] == [], (
        "stderr is left"
    )


async def test_adding_and_removing_a_circuit_breaker_by_reload(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    async def refuse(_request: web.Request, _number: int) -> web.Response:
        return web.Response(status=503)

    downstream = await Downstream(behaviour=refuse).start()
    bigpipe, _ = await start_node(kafka, tmp_path, processes, retries=0, delayThreshold=30_000)

    async def fail_calls(count: int) -> None:
        sent = (await group_stats(bigpipe, http))["rpcTotal"] + count
        for _ in range(count):
            status, _ = await bigpipe.post_call(http, url=downstream.url())
            assert status == 200

        async def finished() -> bool:
            return (await group_stats(bigpipe, http))["rpcTotal"] == sent

        await eventually(finished, 30, f"{count} failing calls to finish")

    await fail_calls(10)
    assert (await group_stats(bigpipe, http))["breakerState"] == 0, "no breaker, no BREAK"

    # Its BREAK (20 s) is shorter than delayThreshold (30 s): its calls are held, so a
    # reload reaches them (a parked call comes back when its wait ends).
    breaker = {
        "breakPeriod": 20,
        "recoverPeriod": 5,
        "winSize": 5,
        "minStats": 3,
        "healthRate": 0.5,
    }
    entry = bigpipe.config["kafka.consumer.list"][0]
    rewrite(bigpipe, **{"kafka.consumer.list": [{**entry, "circuitBreaker": breaker}]})
    await reload(bigpipe, http)
    await fail_calls(3)

    async def state_is(state: int) -> bool:
        return (await group_stats(bigpipe, http))["breakerState"] == state

    await eventually(lambda: state_is(1), 10, "the reloaded breaker to open (BREAK)")
    held = [await bigpipe.post_call(http, url=downstream.url()) for _ in range(3)]
    attempts = len(downstream.requests)

    downstream.behaviour = answer_200
    rewrite(bigpipe, **{"kafka.consumer.list": [entry]})  # no breaker: nothing is held
    await reload(bigpipe, http)
    await eventually(lambda: state_is(0), 10, "no breaker, no BREAK")
    await eventually(
        lambda: {reply["data"]["id"] for _, reply in held} <= downstream.answered_ids(),
        30,
        "the calls the breaker held to go out once it is removed",
    )
    assert len(downstream.requests) == attempts + len(held), "held, not tried, while BREAK"
    await downstream.stop()


async def test_kafka_producer_settings_reload_into_a_new_producer(
    http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """A frozen broker (SIGSTOP) never acknowledges: a write then ends at the producer's
    ack timeout, and only there, so the reply's delay shows which timeout is in force."""
    async with own_kafka(tmp_path / "kafka") as (kafka, broker_pid):
        bigpipe, _ = await start_node(
            kafka,
            tmp_path,
            processes,
            node={"kafka.producer.ack.timeout": 20_000, "http.server.write.timeout": 30_000},
        )
        rewrite(bigpipe, **{"kafka.producer.ack.timeout": 1500, "kafka.producer.retries": 5})
        await reload(bigpipe, http)
        status, reply = await bigpipe.post_call(http)
        assert (status, reply["errno"]) == (200, 0), "the new producer writes"
        os.kill(broker_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            status, reply = await bigpipe.post_call(http)
            took = time.monotonic() - started
        finally:
            os.kill(broker_pid, signal.SIGCONT)
        print(f"\nfrozen broker: answered {status}/{reply['errno']} after {took:.1f} s")
        assert (status, reply["errno"]) == (503, 1)
        assert 1.3 < took < 10, "the reloaded 1.5 s ack timeout answers, not the old 20 s"
        assert await bigpipe.stop() == 0


async def test_kafka_client_config_reloads_into_the_consumers(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes, partitions=1)

    async def delivery_latency() -> float:
        """From accepted to arrived, for a call sent as soon as the one before arrived: just
        when the consumer has sent its next fetch to the broker."""
        for _ in range(2):
            sent = time.monotonic()
            status, reply = await bigpipe.post_call(http, url=downstream.url())
            assert (status, reply["errno"]) == (200, 0)
            await eventually(
                lambda call=reply["data"]["id"]: call in downstream.call_ids(), 30, "the call"
            )
        return downstream.requests[-1].at - sent

    before = await delivery_latency()
    # A fetch the broker holds until 1 MB is there or 3 s have passed: with these
    # settings, a lone call waits for the broker's deadline.
    waiting = {"fetch.min.bytes": 1_000_000, "fetch.wait.max.ms": 3000}
    rewrite(bigpipe, **{"kafka.client.config": waiting})
    await reload(bigpipe, http)
    during = await delivery_latency()
    rewrite(bigpipe, **{"kafka.client.config": {}})
    await reload(bigpipe, http)
    after = await delivery_latency()
    print(f"\ndelivery latency: {before:.2f} s, with {waiting} {during:.2f} s, then {after:.2f} s")
    assert before < 1 and after < 1
    assert during > 2, "the consumers run with the reloaded librdkafka settings"


async def test_kafka_client_config_reloads_into_the_status_view_and_the_index(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """The clients beside the groups follow a reload of kafka.client.config too (rotated
    credentials must reach every client): the status view's consumer, the results
    writer and the idempotency index."""
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, partitions=1, node={"status.topic": unique("results")}
    )

    async def visible(call_id: str) -> bool:
        return (await call_status(bigpipe, http, call_id))[0] == 200

    async def view_latency() -> float:
        """From one call's status showing to the next one's, the second sent at once: just
        when the view's consumer has sent its next fetch to the broker."""
        first = await bigpipe.post_accepted(http, url=downstream.url())
        await eventually(lambda: visible(first["id"]), 30, "the first call's status")
        shown = time.monotonic()
        second = await bigpipe.post_accepted(http, url=downstream.url())
        await eventually(lambda: visible(second["id"]), 30, "the second call's status")
        return time.monotonic() - shown

    key = unique("rotate")  # the index topic outlives the test: a key of this run's own
    keyed = await bigpipe.post_accepted(http, url=downstream.url(), idempotency_key=key)
    before = await view_latency()
    waiting = {"fetch.min.bytes": 1_000_000, "fetch.wait.max.ms": 3000}
    rewrite(bigpipe, **{"kafka.client.config": waiting})
    await reload(bigpipe, http)
    during = await view_latency()
    again = await bigpipe.post_accepted(http, url=downstream.url(), idempotency_key=key)
    assert again == {"id": keyed["id"], "duplicate": True}, "the new index sees the old key"
    rewrite(bigpipe, **{"kafka.client.config": {}})
    await reload(bigpipe, http)
    after = await view_latency()
    print(
        f"\nstatus view latency: {before:.2f} s, with {waiting} {during:.2f} s, then {after:.2f} s"
    )
    assert before < 1.5 and after < 1.5
    assert during > 2, "the status view follows with the reloaded librdkafka settings"


async def test_a_reload_before_the_node_joined_kafka_swaps_the_producer(tmp_path: Path) -> None:
    """Kafka unreachable, so the node has not joined: a reload of producer settings must
    still give it a producer with them, or the old settings would run until a restart."""
    raw = base_config(
        f"127.0.0.1:{free_port()}", unique("calls"), free_port(), **{"kafka.producer.retries": 3}
    )
    path = tmp_path / "bigpipe.json"
    path.write_bytes(orjson.dumps(raw))
    node = Node(parse_config(raw, source=path))
    await node.start()
    try:
        first = node.producer
        path.write_bytes(orjson.dumps({**raw, "kafka.producer.retries": 7}))
        assert await node.reload()
        assert not node.ready, "still not joined: Kafka is unreachable"
        assert node.config.producer_retries == 7
        assert node.producer is not first, "the producer was made with the old settings"
    finally:
        await node.stop()
