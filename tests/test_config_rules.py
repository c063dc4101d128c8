"""Every validation rule the README states exists: `bigpipe --check` on a file that breaks
exactly that rule exits 2 with exactly one line, and that line names the key.

The property tests (test_hostile_input.py) check the form of any error; these check that
each rule is there. Each case starts from the shipped example and breaks one thing.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import REPO

EXAMPLE = orjson.loads((REPO / "config" / "bigpipe.json").read_bytes())
Raw = dict[str, Any]


def consumer(index: int, **changes: Any) -> Callable[[Raw], None]:
    return lambda raw: raw["kafka.consumer.list"][index].update(changes)


def breaker(**changes: Any) -> Callable[[Raw], None]:  # the example's group 1 has a breaker
    return lambda raw: raw["kafka.consumer.list"][1]["circuitBreaker"].update(changes)


def top(**changes: Any) -> Callable[[Raw], None]:
    return lambda raw: raw.update({key.replace("_", "."): value for key, value in changes.items()})


def extra_topic(name: str) -> Callable[[Raw], None]:
    return lambda raw: raw["kafka.topics"].append({"name": name, "partitions": 1})


def dead_letter_on_another_call_topic(raw: Raw) -> None:
    raw["kafka.topics"].append({"name": "other", "partitions": 1})
    raw["kafka.consumer.list"][0]["deadLetterTopic"] = "other"


def acl(index: int, **changes: Any) -> Callable[[Raw], None]:
    return lambda raw: raw["kafka.producer.acl"][index].update(changes)


# (rule, how to break it, the key its one error line must name)
RULES: list[tuple[str, Callable[[Raw], None], str]] = [
    (
        "backoffMax >= backoffBase",
        consumer(0, backoffBase=500, backoffMax=499),
        "kafka.consumer.list[0].backoffMax",
    ),
    (
        "retryStatus: no 5xx",
        consumer(0, retryStatus=[408, 503]),
        "kafka.consumer.list[0].retryStatus",
    ),
    ("retryStatus: no 3xx", consumer(0, retryStatus=[301]), "kafka.consumer.list[0].retryStatus"),
    (
        "dead-letter topic is not its own call topic",
        consumer(0, deadLetterTopic="test"),
        "kafka.consumer.list[0].deadLetterTopic",
    ),
    (
        "dead-letter topic is not another call topic",
        dead_letter_on_another_call_topic,
        "kafka.consumer.list[0].deadLetterTopic",
    ),
    ("log.level at least 1", top(log_level=0), "log.level"),
    ("log.level at most 5", top(log_level=6), "log.level"),
    ("topic name: no space", extra_topic("bad topic"), "kafka.topics[1].name"),
    (
        "minInsyncReplicas <= replicationFactor",  # Kafka 4.3 took acks=all writes anyway
        lambda raw: raw["kafka.topics"][0].update(replicationFactor=1, minInsyncReplicas=2),
        "kafka.topics[0].minInsyncReplicas",
    ),
    ("topic name: no slash", extra_topic("a/b"), "kafka.topics[1].name"),
    ("topic name: not empty", extra_topic(""), "kafka.topics[1].name"),
    ("topic name: not '..'", extra_topic(".."), "kafka.topics[1].name"),
    ("topic name: at most 249 characters", extra_topic("t" * 250), "kafka.topics[1].name"),
    (
        "dead-letter topic name",
        consumer(0, deadLetterTopic="dead letters"),
        "kafka.consumer.list[0].deadLetterTopic",
    ),
    (
        "secret_sha256: 64 digits",
        acl(2, secret_sha256="ab" * 31),
        "kafka.producer.acl[2].secret_sha256",
    ),
    (
        "secret_sha256: hex digits only",
        acl(2, secret_sha256="zz" * 32),
        "kafka.producer.acl[2].secret_sha256",
    ),
    ("breaker breakPeriod > 0", breaker(breakPeriod=0), "circuitBreaker.breakPeriod"),
    ("breaker recoverPeriod > 0", breaker(recoverPeriod=-1), "circuitBreaker.recoverPeriod"),
    ("breaker winSize > 0", breaker(winSize=0), "circuitBreaker.winSize"),
    ("breaker winSize an integer", breaker(winSize=2.5), "circuitBreaker.winSize"),
    ("breaker minStats >= 0", breaker(minStats=-1), "circuitBreaker.minStats"),
    ("breaker healthRate <= 1", breaker(healthRate=1.01), "circuitBreaker.healthRate"),
    ("breaker healthRate >= 0", breaker(healthRate=-0.5), "circuitBreaker.healthRate"),
    (
        "breaker fields are required",
        lambda raw: raw["kafka.consumer.list"][1]["circuitBreaker"].pop("winSize"),
        "circuitBreaker.winSize",
    ),
    (
        "adaptiveConcurrency is true or false",
        consumer(0, adaptiveConcurrency="yes"),
        "kafka.consumer.list[0].adaptiveConcurrency",
    ),
    (
        "destination.concurrency <= the group's concurrency",
        consumer(0, destination={"concurrency": 6}),
        "kafka.consumer.list[0].destination.concurrency",
    ),
    (
        "destination.rateLimit > 0",
        consumer(0, destination={"rateLimit": 0}),
        "kafka.consumer.list[0].destination.rateLimit",
    ),
    (
        "destination.maxHeld an integer > 0",
        consumer(0, destination={"maxHeld": 0}),
        "kafka.consumer.list[0].destination.maxHeld",
    ),
    (
        "destination: no unknown keys",
        consumer(0, destination={"concurency": 2}),
        "kafka.consumer.list[0].destination.concurency",
    ),
    (
        "destination.overrides[].match: a host pattern or an origin without a path",
        consumer(0, destination={"overrides": [{"match": "https://a.example.com/hooks"}]}),
        "kafka.consumer.list[0].destination.overrides[0].match",
    ),
    (
        "destination.overrides[].match is required",
        consumer(0, destination={"overrides": [{"concurrency": 1}]}),
        "kafka.consumer.list[0].destination.overrides[0].match",
    ),
    (
        "destination.overrides[].match listed once",
        consumer(0, destination={"overrides": [{"match": "a.example.com"}] * 2}),
        "kafka.consumer.list[0].destination.overrides[1].match",
    ),
    (
        "destination.overrides[].rateLimit <= the group's rateLimit",
        consumer(0, destination={"overrides": [{"match": "*.example.com", "rateLimit": 101}]}),
        "kafka.consumer.list[0].destination.overrides[0].rateLimit",
    ),
    (
        "http.server.read.timeout > 0",
        top(**{"http.server.read.timeout": 0}),
        "http.server.read.timeout",
    ),
    (
        "http.server.write.timeout > 0",
        top(**{"http.server.write.timeout": -5}),
        "http.server.write.timeout",
    ),
    (
        "http.server.shutdown.timeout > 0",
        top(**{"http.server.shutdown.timeout": 0}),
        "http.server.shutdown.timeout",
    ),
    (
        "http.server.read.timeout an integer",
        top(**{"http.server.read.timeout": "5s"}),
        "http.server.read.timeout",
    ),
    (
        "kafka.producer.ack.timeout > 0",
        top(**{"kafka.producer.ack.timeout": 0}),
        "kafka.producer.ack.timeout",
    ),
]


def check(tmp_path: Path, raw: Raw) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bigpipe.json"
    path.write_bytes(orjson.dumps(raw))
    return subprocess.run(
        [sys.executable, "-m", "bigpipe", "-config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_the_unbroken_example_passes(tmp_path: Path) -> None:
    result = check(tmp_path, copy.deepcopy(EXAMPLE))
    assert (result.returncode, result.stdout, result.stderr) == (0, "config ok\n", "")


@pytest.mark.parametrize(("rule", "breakage", "key"), RULES, ids=[rule for rule, _, _ in RULES])
def test_each_rule_refuses_the_file_with_one_line_naming_the_key(
    tmp_path: Path, rule: str, breakage: Callable[[Raw], None], key: str
) -> None:
    raw = copy.deepcopy(EXAMPLE)
    breakage(raw)
    result = check(tmp_path, raw)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f"{rule}: exit {result.returncode}, stderr {result.stderr!r}"
    assert len(lines) == 1, f"{rule}: exactly this rule is broken, so one line: {lines}"
    prefix = "bigpipe: config error: "
    assert lines[0].startswith(prefix), lines[0]
    named = lines[0][len(prefix) :].split(": ", 1)[0]
    assert named.endswith(key), f"{rule}: the line must name {key}: {lines[0]}"
    assert result.stdout == ""
