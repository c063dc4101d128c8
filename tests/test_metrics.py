"""/metrics in Prometheus format agrees with /stats, and carries latencies, breaker and lag."""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    REPO,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    group_stats,
    own_kafka,
    reload,
    rewrite,
    start_node,
    unique,
)

CALLS = 5


async def scrape(bigpipe: Bigpipe, http: aiohttp.ClientSession) -> dict[str, dict]:
    """Samples by name, each a dict from its labels (as a sorted tuple) to its value."""
    async with http.get(f"{bigpipe.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def test_metrics_match_stats_and_cover_latency_breaker_and_lag(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    breaker = {
        "breakPeriod": 5,
        "recoverPeriod": 5,
        "winSize": 10,
        "minStats": 50,
        "healthRate": 0.5,
    }
    bigpipe, topic = await start_node(kafka, tmp_path, processes, circuitBreaker=breaker)
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    for _ in range(CALLS):
        await bigpipe.post_call(http, url=downstream.url())
    await eventually(lambda: len(downstream.requests) == CALLS, 30, "the deliveries")

    async def lag_reported() -> bool:  # librdkafka reports statistics every 5 s
        return "bigpipe_consumer_lag" in await scrape(bigpipe, http)

    await eventually(lag_reported, 15, "consumer lag in /metrics")
    samples = await scrape(bigpipe, http)
    stats = await bigpipe.stats(http)
    key = (("group", group), ("topic", topic))
    assert samples["bigpipe_calls_accepted_total"][()] == stats["serverStats"]["acceptedCall"]
    assert samples["bigpipe_calls_received_total"][()] == CALLS
    assert samples["bigpipe_kafka_writes_total"][(("result", "success"), ("topic", topic))] == CALLS
    assert (
        samples["bigpipe_calls_finished_total"][(*key[:1], ("result", "success"), key[1])] == CALLS
    )
    assert samples["bigpipe_attempts_total"][key] == CALLS
    assert samples["bigpipe_dead_letters_total"][key] == 0
    assert samples["bigpipe_in_flight"][key] == 0
    assert samples["bigpipe_breaker_state"][key] == 0
    assert samples["bigpipe_ingest_seconds_count"][(("topic", topic),)] == CALLS
    assert samples["bigpipe_attempt_seconds_count"][key] == CALLS
    assert samples["bigpipe_end_to_end_seconds_count"][key] == CALLS
    assert samples["bigpipe_ready"][()] == 1
    assert samples["bigpipe_loop_lag_seconds_count"][()] > 10, "ten a second since it started"
    lag = samples["bigpipe_consumer_lag"]
    assert {dict(labels)["partition"] for labels in lag} == {"0", "1", "2"}
    assert sum(lag.values()) == 0, "everything delivered and committed"


async def test_health_endpoints(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    for path, message in (("/healthz", "alive"), ("/readyz", "ready")):
        async with http.get(f"{bigpipe.url}{path}") as response:
            assert (response.status, (await response.json())["msg"]) == (200, message)


# ---------------------------------------------------------------- every documented metric
@dataclass
class Documented:
    name: str
    kind: str  # counter, gauge or histogram
    labels: set[str]
    values: dict[str, set[str]]  # label -> the values the README lists for it


def documented_metrics() -> list[Documented]:
    """The README's /metrics table, read at test time: a metric added there is checked too."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("### `/metrics`")
    table = readme[start : readme.index("\n\n#", start)]
    metrics = []
    for row in re.findall(r"^\| (`bigpipe_.*)$", table, re.M):
        names, kind, labels = (cell.strip() for cell in re.split(r"(?<!\\)\|", row)[:3])
        values: dict[str, set[str]] = {}
        for label in filter(None, (part.strip() for part in labels.split(","))):
            name, _, listed = label.partition("=")
            values[name] = set(listed.split("\\|")) if listed else set()
        for name in re.findall(r"`(bigpipe_\w+)`", names):
            metrics.append(Documented(name, kind, set(values), values))
    assert len(metrics) >= 17, f"the README's /metrics table was not read: {metrics}"
    return metrics


def samples_of(samples: dict[str, dict], metric: Documented) -> dict:
    names = [metric.name]
    if metric.kind == "histogram":
        names = [f"{metric.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")]
    found: dict = {}
    for name in names:
        found.update(samples.get(name, {}))
    return found


async def test_every_documented_metric_is_scraped_with_its_labels_and_failures_counted(
    http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """One node goes through everything the table names: deliveries and dead letters,
    retries, an invalid record, a reload that works and one that is refused, and a write
    Kafka never acknowledges (its broker, this test's own, frozen). Then every documented
    metric is in one scrape, with exactly its documented labels, each documented value of
    `result` among them, and the failures counted."""

    async def fail_on_request(request: web.Request, _number: int) -> web.Response:
        return web.Response(status=500 if await request.read() == b"fail" else 200)

    documented = documented_metrics()
    downstream = await Downstream(behaviour=fail_on_request).start()
    breaker = {
        "breakPeriod": 5,
        "recoverPeriod": 5,
        "winSize": 10,
        "minStats": 50,
        "healthRate": 0.5,
    }
    async with own_kafka(tmp_path / "kafka") as (kafka, broker_pid):
        topic, group = unique("metrics"), unique("g")
        config = base_config(
            kafka,
            topic,
            free_port(),
            consumers=[consumer_entry(topic, group, retries=1, circuitBreaker=breaker)],
            **{"kafka.producer.ack.timeout": 1500},
        )
        bigpipe = await Bigpipe(config, tmp_path).start()
        processes.append(bigpipe)
        for data in ("ok", "ok", "ok", "fail", "fail"):
            status, reply = await bigpipe.post_call(http, data=data, url=downstream.url())
            assert (status, reply["errno"]) == (200, 0), reply
        producer = Producer({"bootstrap.servers": kafka})
        producer.produce(topic, b"not a call")
        producer.flush(10)

        async def all_finished() -> bool:
            stats = await group_stats(bigpipe, http)
            return (stats["rpcTotal"], stats["deadLetter"]) == (5, 3)

        await eventually(all_finished, 30, "five calls finished, three dead letters")
        await reload(bigpipe, http)
        rewrite(bigpipe, **{"log.level": 9})
        await reload(bigpipe, http, ok=False)
        os.kill(broker_pid, signal.SIGSTOP)
        try:
            status, reply = await bigpipe.post_call(http, url=downstream.url())
        finally:
            os.kill(broker_pid, signal.SIGCONT)
        assert (status, reply["errno"]) == (503, 1), reply

        async def statistics_reported() -> bool:  # librdkafka reports them every 5 s,
            # the group's consumer and its delay readers each on its own clock
            return {"bigpipe_consumer_lag", "bigpipe_waiting"} <= set(await scrape(bigpipe, http))

        await eventually(statistics_reported, 30, "consumer lag and waiting calls in /metrics")
        samples = await scrape(bigpipe, http)
        await bigpipe.stop()
    await downstream.stop()

    missing, wrong_labels, missing_values = [], [], []
    for metric in documented:
        found = samples_of(samples, metric)
        if not found:
            missing.append(metric.name)
            continue
        labels = {name for key in found for name, _ in key} - {"le"}
        if labels != metric.labels:
            wrong_labels.append((metric.name, labels, metric.labels))
        for label, values in metric.values.items():
            seen = {dict(key).get(label) for key in found}
            if not values <= seen:
                missing_values.append((metric.name, label, values - seen))
    assert missing == [], f"documented, never scraped: {missing}"
    assert wrong_labels == [], f"labels differ from the README: {wrong_labels}"
    assert missing_values == [], f"documented label values never scraped: {missing_values}"

    group_key = (("group", group), ("topic", topic))
    assert samples["bigpipe_kafka_writes_total"][(("result", "fail"), ("topic", topic))] == 1
    assert (
        samples["bigpipe_calls_finished_total"][(group_key[0], ("result", "fail"), group_key[1])]
        == 2
    )
    assert samples["bigpipe_reloads_total"][(("result", "failure"),)] == 1
    assert samples["bigpipe_reloads_total"][(("result", "success"),)] == 1
    assert samples["bigpipe_invalid_messages_total"][group_key] == 1
    assert samples["bigpipe_dead_letters_total"][group_key] == 3
    assert samples["bigpipe_retries_total"][group_key] == 2
    # Five calls, two of them failing twice; the call Kafka did not acknowledge in time may
    # still have been stored (errno 1 says it may), and then it is delivered too.
    assert samples["bigpipe_attempts_total"][group_key] in (7, 8)
