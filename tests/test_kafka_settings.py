"""librdkafka settings (`kafka.client.config`) and the Kafka address, at --check, at start
and on reload: one line naming the key, exit 2, and a running node left as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bigpipe.calls.dedup import index_reader_settings
from bigpipe.calls.status import status_producer_settings
from bigpipe.calls.status_view import builder_kafka_settings
from bigpipe.config import parse_config
from bigpipe.config_error import ConfigError
from bigpipe.delivery.delay_topics import delay_reader_settings
from bigpipe.kafka import consumer_settings, producer_settings
from tests.support import (
    REPO,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    reload,
    rewrite,
    start_node,
    unique,
)

BAD_SETTINGS = [
    ({"no.such.setting": 1}, "kafka.client.config.no.such.setting: librdkafka has no such"),
    ({"socket.timeout.ms": "soon"}, "kafka.client.config.socket.timeout.ms: librdkafka refuses"),
    # Valid alone, but not with the idempotent producer Bigpipe runs.
    ({"max.in.flight.requests.per.connection": 10}, "librdkafka refuses the settings"),
    ({"enable.auto.commit": True}, "kafka.client.config.enable.auto.commit: is set by Bigpipe"),
]


def run_bigpipe(config: dict[str, Any], tmp_path: Path, *options: str) -> subprocess.Popen[str]:
    path = tmp_path / "bigpipe.json"
    path.write_bytes(orjson.dumps(config))
    return subprocess.Popen(
        [sys.executable, "-m", "bigpipe", "-config", str(path), *options],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
@pytest.mark.parametrize("options", [("--check",), ()], ids=["check", "start"])
def test_bad_client_settings_are_one_line_and_exit_2(
    kafka: str, tmp_path: Path, settings: dict[str, Any], message: str, options: tuple[str, ...]
) -> None:
    config = base_config(
        kafka, unique("settings"), free_port(), **{"kafka.client.config": settings}
    )
    process = run_bigpipe(config, tmp_path, *options)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2, err
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("bigpipe: config error: ") and message in line


async def refused(bigpipe: Bigpipe, http: aiohttp.ClientSession, problem: str) -> None:
    """SIGUSR1 with the rewritten file: counted as refused, with its one-line reason."""
    await reload(bigpipe, http, ok=False)
    line = f"reload rejected, old config kept: {problem}"
    await eventually(lambda: line in bigpipe.log_tail(), 10, "the one-line rejection")


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_reload_with_bad_client_settings_is_refused_and_counted(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe], workers: int
) -> None:
    """With workers, the supervisor checks the file in a child process (bigpipe.node.preflight)."""
    node = {"http.server.workers": workers}
    bigpipe, _ = await start_node(kafka, tmp_path, processes, node=node)
    rewrite(bigpipe, **{"kafka.client.config": {"no.such.setting": 1}})
    await refused(bigpipe, http, "kafka.client.config.no.such.setting: librdkafka has no such")
    assert "Traceback" not in bigpipe.log_tail() and "never retrieved" not in bigpipe.log_tail()
    status, reply = await bigpipe.post_call(http)
    assert (status, reply["errno"]) == (200, 0), "the old settings keep running"
    assert await bigpipe.stop() == 0


async def test_a_reload_to_another_kafka_cluster_is_refused(
    kafka: str,
    http: aiohttp.ClientSession,
    downstream: Downstream,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    rewrite(bigpipe, **{"kafka.bootstrap.servers": f"127.0.0.1:{free_port()}"})
    await refused(bigpipe, http, "kafka.bootstrap.servers: changed from")
    assert "needs a restart" in bigpipe.log_tail()
    status, reply = await bigpipe.post_call(http, url=downstream.url())
    assert (status, reply["errno"]) == (200, 0)
    await eventually(
        lambda: reply["data"]["id"] in downstream.call_ids(), 30, "delivery from the old cluster"
    )
    assert await bigpipe.stop() == 0


# Settings Bigpipe picks for its clients, for speed or memory, that the operator may tune:
# a value of theirs in kafka.client.config wins (it was silently overwritten before).
TUNABLE = {
    "linger.ms": 7,  # the ingest producer's (and the status producer's)
    "session.timeout.ms": 15_000,  # the consumers'
    "queued.max.messages.kbytes": 2048,
    "fetch.queue.backoff.ms": 100,
    "fetch.wait.max.ms": 200,  # the delay readers' and the budget's
    "compression.type": "zstd",  # the status producer's
}


def test_an_operators_own_tuning_wins_over_bigpipes_choice() -> None:
    topic = unique("t")
    raw = base_config("127.0.0.1:1", topic, free_port(), consumers=[consumer_entry(topic, "g")])
    config = parse_config({**raw, "kafka.client.config": TUNABLE})
    producer, consumer = producer_settings(config), consumer_settings(config, config.consumers[0])
    assert producer["linger.ms"] == 7
    assert {key: consumer[key] for key in list(TUNABLE)[1:4]} == {
        key: TUNABLE[key] for key in list(TUNABLE)[1:4]
    }
    status = status_producer_settings(config)
    assert (status["linger.ms"], status["compression.type"]) == (7, "zstd")
    assert delay_reader_settings(config, config.consumers[0])["fetch.wait.max.ms"] == 200
    # Untuned, Bigpipe's own choices stand.
    plain = parse_config(raw)
    assert producer_settings(plain)["linger.ms"] == 1
    assert status_producer_settings(plain)["linger.ms"] == 50
    assert consumer_settings(plain, plain.consumers[0])["fetch.queue.backoff.ms"] == 10


@pytest.mark.parametrize(
    "setting",
    [
        # true: the ingest producer hears only of failures, and no call is ever answered
        {"delivery.report.only.error": True},
        # each reader of Bigpipe's own topics sets it for the way it reads
        {"enable.partition.eof": True},
        # follows http.server.shutdown.timeout: a drain must finish within it
        {"max.poll.interval.ms": 30_000},
    ],
)
def test_settings_that_would_break_a_guarantee_are_refused_by_name(
    setting: dict[str, Any],
) -> None:
    raw = base_config("127.0.0.1:1", unique("t"), free_port())
    with pytest.raises(ConfigError) as refused:
        parse_config({**raw, "kafka.client.config": setting})
    [name] = setting
    assert f"kafka.client.config.{name}: is set by Bigpipe itself; remove it" in str(refused.value)


def test_every_reader_that_catches_up_fetches_again_at_once_and_bounds_its_prefetch() -> None:
    """librdkafka waits fetch.queue.backoff.ms (1 s) whenever a reader's prefetch is full:
    a group's backlog of 2 KiB calls went at half speed, and a worker read an index of a
    million keys in 9.2 s instead of 2.5. Its default prefetch (64 MiB, counted in payload
    bytes only) was also several times that in RSS."""
    topic = unique("t")
    raw = base_config("127.0.0.1:1", topic, free_port(), consumers=[consumer_entry(topic, "g")])
    config = parse_config(raw)
    readers = {
        "group": consumer_settings(config, config.consumers[0]),
        "delay readers": delay_reader_settings(config, config.consumers[0]),
        "idempotency index": index_reader_settings(config),
    }
    for name, settings in readers.items():
        assert settings["fetch.queue.backoff.ms"] <= 10, name
        assert settings["queued.max.messages.kbytes"] <= 8192, name
    # The status view's builder, a process of its own, gets its settings from its worker.
    view = builder_kafka_settings(config)
    assert view["fetch.queue.backoff.ms"] <= 10
    assert view["queued.max.messages.kbytes"] <= 8192
