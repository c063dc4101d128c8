"""What a log line says: who wrote it, when (RFC 3339 UTC), what a reload changed (never
a secret), and a true sentence when Kafka is away."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson

from tests.support import (
    ACL_NAME,
    Bigpipe,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    reload,
    rewrite,
    start_node,
    unique,
)

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<origin>supervisor|worker-\d+) (bigpipe[.\w]*|librdkafka): "
)


async def test_each_line_of_a_node_with_workers_names_its_writer(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    topic = unique("origin")
    config = base_config(
        kafka,
        topic,
        free_port(),
        consumers=[consumer_entry(topic, unique("g"))],
        **{"http.server.workers": 2},
    )
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    assert await bigpipe.stop() == 0
    lines = bigpipe.log_tail(1000).splitlines()
    bad = [line for line in lines if not TEXT_LINE.match(line)]
    assert not bad, f"lines without a time, a level or a writer: {bad[:3]}"
    listening = sorted(TEXT_LINE.match(line)["origin"] for line in lines if "listening on" in line)
    assert listening == ["worker-0", "worker-1"]
    assert any(TEXT_LINE.match(line)["origin"] == "supervisor" for line in lines)


async def test_json_lines_carry_an_rfc3339_utc_time(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    config = base_config(kafka, unique("json"), free_port(), **{"log.format": "json"})
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    assert await bigpipe.stop() == 0
    entries = [orjson.loads(line) for line in bigpipe.log_tail(1000).splitlines()]
    assert entries and all(entry["time"].endswith("Z") for entry in entries)
    first = datetime.fromisoformat(entries[0]["time"])
    assert first.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - first) < timedelta(minutes=5), "UTC, not local time"


async def test_a_reload_logs_which_keys_changed_and_no_secret(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes)
    secret = "the-new-secret-must-not-be-logged"
    group = dict(bigpipe.config["kafka.consumer.list"][0], rateLimit=77)
    rewrite(
        bigpipe,
        **{
            "kafka.producer.acl": [{"name": ACL_NAME, "secret": secret, "topic": topic}],
            "kafka.consumer.list": [group],
            "kafka.client.config": {"sasl.password": "also-not-this-one"},
        },
    )
    await reload(bigpipe, http)
    # The log is written by a thread: the line may come a moment after the counter.
    await eventually(lambda: "reloaded" in bigpipe.log_tail(), 10, "the reload's log line")
    line_found = [line for line in bigpipe.log_tail().splitlines() if "reloaded" in line]
    assert len(line_found) == 1
    [line] = line_found
    for key in (
        f"kafka.producer.acl[{ACL_NAME}].secret",
        f"kafka.consumer.list[{topic}/{group['groupId']}].rateLimit",
        "kafka.client.config.sasl.password",
    ):
        assert key in line
    assert secret not in bigpipe.log_tail() and "also-not-this-one" not in bigpipe.log_tail()
    assert await bigpipe.stop() == 0


async def test_kafka_away_is_said_in_words_that_are_true(
    tmp_path: Path, processes: list[Bigpipe]
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: every connection fails
    bigpipe = Bigpipe(base_config(nowhere, unique("away"), free_port()), tmp_path)
    processes.append(bigpipe)
    await bigpipe.start(wait_ready=False)
    await eventually(
        lambda: "no broker reachable" in bigpipe.log_tail(), 30, "the producer's error line"
    )
    assert "brokers are down" not in bigpipe.log_tail(), "librdkafka's connection counts"
    assert await bigpipe.stop() == 0
