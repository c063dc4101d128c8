"""/metrics in Prometheus format agrees with /stats, and carries latencies, breaker and lag."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Bigpipe, Downstream, eventually, start_node

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
    assert samples["bigpipe_delivery_seconds_count"][key] == CALLS
    assert samples["bigpipe_ready"][()] == 1
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
