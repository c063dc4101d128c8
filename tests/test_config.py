"""Each config validation rule: one line naming the key path and the fix."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bigpipe.config import ConfigError, parse_config
from bigpipe.node.preflight import load_checked

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = orjson.loads((REPO / "config" / "bigpipe.json").read_bytes())


def problems_of(mutate: Any) -> list[str]:
    raw = copy.deepcopy(EXAMPLE)
    mutate(raw)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return caught.value.problems


def test_example_config_is_valid() -> None:
    config = parse_config(EXAMPLE)
    assert [c.group_id for c in config.consumers] == ["G1", "G2"]
    assert config.consumers[0].dead_letter_topic == "test.G1.dlq"
    assert config.consumers[1].breaker is not None
    assert config.body_limit == 1 << 20


@pytest.mark.parametrize(
    "key",
    [
        "kafka.bootstrap.servers",
        "kafka.topics",
        "kafka.producer.acl",
        "kafka.consumer.list",
        "http.server.port",
    ],
)
def test_missing_required_key(key: str) -> None:
    assert problems_of(lambda raw: raw.pop(key)) == [
        f"{key}: is missing; add it" + problems_of_hint(key)
    ]


def problems_of_hint(key: str) -> str:
    hints = {
        "kafka.bootstrap.servers": ', e.g. "127.0.0.1:9092"',
        "kafka.topics": ", a list of {name, partitions}",
        "kafka.producer.acl": ", a list of {name, secret, topic}",
        "kafka.consumer.list": ", a list of {topic, groupId, rateLimit, timeout, retries, "
        "concurrency}",
        "http.server.port": "",
    }
    return hints[key]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("http.server.port",), "10086", "http.server.port: must be an integer, got a string"),
        (("log.level",), 2.5, "log.level: must be an integer, got a number"),
        (("kafka.topics",), {}, "kafka.topics: must be a list, got an object"),
        (
            ("kafka.consumer.list", 0, "concurrency"),
            True,
            "kafka.consumer.list[0].concurrency: must be an integer, got a boolean",
        ),
        (
            ("kafka.producer.acl", 0, "secret"),
            None,
            "kafka.producer.acl[0].secret: must be a string, got null",
        ),
        (
            ("kafka.consumer.list", 1, "circuitBreaker"),
            [],
            "kafka.consumer.list[1].circuitBreaker: must be an object, got a list",
        ),
    ],
)
def test_wrong_type(path: tuple[Any, ...], value: Any, expected: str) -> None:
    def mutate(raw: Any) -> None:
        target = raw
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    assert expected in problems_of(mutate)


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("kafka.topics[0]", "partitions", 0),
        ("kafka.consumer.list[0]", "rateLimit", 0),
        ("kafka.consumer.list[0]", "concurrency", -3),
        ("kafka.consumer.list[0]", "timeout", 0),
    ],
)
def test_non_positive_numbers(where: str, key: str, value: int) -> None:
    def mutate(raw: Any) -> None:
        section = (
            raw["kafka.topics"][0]
            if where.startswith("kafka.topics")
            else raw["kafka.consumer.list"][0]
        )
        section[key] = value

    assert problems_of(mutate) == [
        f"{where}.{key}: must be > 0, got {value}; use a positive number"
    ]


def test_negative_retries() -> None:
    problems = problems_of(lambda raw: raw["kafka.consumer.list"][0].update(retries=-1))
    assert problems == ["kafka.consumer.list[0].retries: must be >= 0, got -1; use 0 or more"]


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_health_rate_outside_unit_interval(rate: float) -> None:
    problems = problems_of(
        lambda raw: raw["kafka.consumer.list"][1]["circuitBreaker"].update(healthRate=rate)
    )
    assert problems == [
        f"kafka.consumer.list[1].circuitBreaker.healthRate: must be between 0 and 1, got {rate}"
    ]


def test_acl_topic_not_in_topics() -> None:
    problems = problems_of(lambda raw: raw["kafka.producer.acl"][1].update(topic="nope"))
    assert problems == [
        "kafka.producer.acl[1].topic: 'nope' is not in kafka.topics; add it there or fix the name"
    ]


def test_consumer_topic_not_in_topics() -> None:
    problems = problems_of(lambda raw: raw["kafka.consumer.list"][0].update(topic="nope"))
    assert problems == [
        "kafka.consumer.list[0].topic: 'nope' is not in kafka.topics; add it there or fix the name"
    ]


def test_duplicate_acl_names() -> None:
    problems = problems_of(lambda raw: raw["kafka.producer.acl"][1].update(name="system-1"))
    assert problems == [
        "kafka.producer.acl[1].name: duplicate ACL name 'system-1'; names must be unique"
    ]


def test_duplicate_topic_and_group() -> None:
    problems = problems_of(lambda raw: raw["kafka.consumer.list"][1].update(groupId="G1"))
    assert problems == [
        "kafka.consumer.list[1]: duplicate (topic, groupId) ('test', 'G1'); "
        "each consumer group may be listed once per topic"
    ]


def test_unknown_key_suggests_the_close_one() -> None:
    problems = problems_of(lambda raw: raw.update({"http.server.prot": 1}))
    assert problems == ["http.server.prot: unknown key; did you mean 'http.server.port'?"]
    problems = problems_of(lambda raw: raw["kafka.consumer.list"][0].update(ratelimit=5))
    assert problems == ["kafka.consumer.list[0].ratelimit: unknown key; did you mean 'rateLimit'?"]


def test_unknown_key_far_from_any_is_to_be_removed() -> None:
    assert problems_of(lambda raw: raw.update(zzz=1)) == ["zzz: unknown key; remove it"]


def test_every_problem_is_reported_at_once() -> None:
    def mutate(raw: Any) -> None:
        raw["kafka.topics"][0]["partitions"] = 0
        raw["kafka.consumer.list"][0]["concurrency"] = 0
        raw["http.server.port"] = 70000

    assert len(problems_of(mutate)) == 3


def test_hashed_secret_is_accepted_and_clear_one_hashed() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.producer.acl"][0] = {"name": "system-1", "topic": "test", "secret_sha256": "ab" * 32}
    config = parse_config(raw)
    assert config.acl[0].secret_sha256 == bytes.fromhex("ab" * 32)
    assert len(config.acl[1].secret_sha256) == 32


def test_dead_letter_topic_must_not_be_a_call_topic() -> None:
    problems = problems_of(lambda raw: raw["kafka.consumer.list"][0].update(deadLetterTopic="test"))
    assert problems == ["kafka.consumer.list[0].deadLetterTopic: must differ from topic 'test'"]


def test_unreadable_and_invalid_json_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_checked(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_checked(bad)


def test_cli_reports_problems_one_per_line_and_exits_2(tmp_path: Path) -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.consumer.list"][0]["rateLimit"] = 0
    raw["log.levle"] = 3
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(raw))
    result = subprocess.run(
        [sys.executable, "-m", "bigpipe", "-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "bigpipe: config error: kafka.consumer.list[0].rateLimit: must be > 0, got 0; "
        "use a positive number",
        "bigpipe: config error: log.levle: unknown key; did you mean 'log.level'?",
    ]


def test_cli_check_accepts_the_example() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigpipe",
            "--config",
            str(REPO / "config" / "bigpipe.json"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "config ok\n")


@pytest.mark.parametrize(
    "token", ["short-0123", "has a space in it 0123456789", "tøken-0123456789abcdefghijk"]
)
def test_admin_token_too_short_or_unsendable_is_refused_without_echoing_it(token: str) -> None:
    def set_token(raw: dict[str, Any]) -> None:
        raw["http.admin.token"] = token

    [problem] = problems_of(set_token)
    assert problem.startswith("http.admin.token: must be")
    assert token not in problem, "the token is a secret: never repeated"


def test_compat_replies_must_be_a_bool() -> None:
    def set_compat(raw: dict[str, Any]) -> None:
        raw["http.server.compat.replies"] = "yes"

    assert problems_of(set_compat) == [
        "http.server.compat.replies: must be true or false, got a string"
    ]
