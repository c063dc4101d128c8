"""One declaration per key (bigpipe/config.py) and what comes from it: the validation, the
shipped JSON Schema, the README's tables, `bigpipe config ...`, and the cost of a reload."""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings

from bigpipe.config import Config, ConfigError, parse_config
from bigpipe.config_docs import (
    BEGIN,
    SCHEMA_FILE,
    TABLES,
    json_schema,
    json_schema_text,
    tables,
    with_tables,
)
from bigpipe.declare import Key, Reload, fields_of, metadata
from bigpipe.node.reload import RESTART_FIELDS, check_reload
from tests.support import REPO, base_config, consumer_entry
from tests.test_hostile_input import mutated_reference

EXAMPLE = orjson.loads((REPO / "config" / "bigpipe.json").read_bytes())
REFUSED = Reload.REFUSED
VALIDATOR = jsonschema.Draft202012Validator(json_schema())


def bigpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bigpipe", *args], capture_output=True, text=True, timeout=60
    )


def problems_of(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return caught.value.problems


def repo_config_files() -> list[Path]:
    """Every config file in the repo: its JSON files that are objects with a Kafka address."""
    listed = subprocess.run(
        ["git", "ls-files", "*.json"], cwd=REPO, capture_output=True, text=True, check=True
    )
    documents = {
        REPO / name: orjson.loads((REPO / name).read_bytes()) for name in listed.stdout.split()
    }
    return [f for f, doc in documents.items() if isinstance(doc, dict) and "kafka.topics" in doc]


# ---------------------------------------------------------------- the published schema
def test_the_shipped_schema_is_the_declarations_schema() -> None:
    shipped = (REPO / SCHEMA_FILE).read_text()
    assert shipped == json_schema_text(), f"run: bigpipe config schema > {SCHEMA_FILE}"


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_bigpipe_config_schema_prints_it() -> None:
    result = bigpipe("config", "schema")
    assert (result.returncode, result.stdout) == (0, (REPO / SCHEMA_FILE).read_text())


def test_the_example_names_its_schema_and_bigpipe_accepts_that() -> None:
    example = REPO / "config" / "bigpipe.json"
    assert (example.parent / EXAMPLE["$schema"]).resolve() == (REPO / SCHEMA_FILE).resolve()
    assert parse_config(EXAMPLE).schema_ref == "./bigpipe.schema.json"


@pytest.mark.parametrize("path", repo_config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_in_the_repo_fits_the_schema_and_loads(path: Path) -> None:
    raw = orjson.loads(path.read_bytes())
    assert [error.message for error in VALIDATOR.iter_errors(raw)] == []
    parse_config(raw)


def test_the_configs_the_tests_write_fit_the_schema() -> None:
    raw = base_config("127.0.0.1:9092", "t", 8080, consumers=[consumer_entry("t", "g")])
    assert [error.message for error in VALIDATOR.iter_errors(raw)] == []


def test_the_repo_has_the_config_files_it_should() -> None:
    names = {str(path.relative_to(REPO)) for path in repo_config_files()}
    assert {"config/bigpipe.json", "deploy/docker/bigpipe.json"} <= names


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=mutated_reference())
def test_the_schema_accepts_every_file_bigpipe_accepts(raw: Any) -> None:
    """The schema is never stricter than Bigpipe: an editor flags no file that would run.

    (It is looser: rules across keys are Bigpipe's alone.)"""
    try:
        parse_config(raw)
    except ConfigError:
        return
    assert [error.message for error in VALIDATOR.iter_errors(raw)] == []


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"http.server.port": 0}, "http.server.port"),
        ({"log.format": "xml"}, "log.format"),
        ({"kafka.client.config": {"acks": "1"}}, "kafka.client.config"),
        ({"kafka.topics": []}, "kafka.topics"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_the_schema_refuses_what_bigpipe_refuses(change: dict[str, Any], key: str) -> None:
    raw = {**EXAMPLE, **change}
    assert any(problem.startswith(key) for problem in problems_of(raw))
    assert list(VALIDATOR.iter_errors(raw)), f"the schema lets {change} through"


def test_the_schema_wants_one_secret_per_caller() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.producer.acl"][0].pop("secret")
    assert list(VALIDATOR.iter_errors(raw))
    raw["kafka.producer.acl"][0].update(secret="s", secret_sha256="ab" * 32)
    assert list(VALIDATOR.iter_errors(raw))


# ---------------------------------------------------------------- the README's tables
def test_the_readme_tables_are_the_declarations() -> None:
    readme = (REPO / "README.md").read_text()
    for name in TABLES:
        assert BEGIN.format(name) in readme, f"README lost its {name} table"
    assert with_tables(readme) == readme, "run: bigpipe config docs --readme README.md"


def test_every_declared_key_is_in_a_readme_table() -> None:
    documented = tables()
    for model in TABLES.values():
        for alias, info in fields_of(model).items():
            assert f"| `{alias}` |" in documented
            assert info.description, f"{alias} has no documentation line"


def test_bigpipe_config_docs_prints_the_tables(tmp_path: Path) -> None:
    result = bigpipe("config", "docs")
    assert (result.returncode, result.stdout) == (0, tables())
    stale = tmp_path / "README.md"
    stale.write_text(
        f"intro\n{BEGIN.format('circuitBreaker')}\nold\n<!-- end of bigpipe config docs -->\n"
    )
    assert bigpipe("config", "docs", "--readme", str(stale)).returncode == 0
    assert stale.read_text() == with_tables(stale.read_text()) != "intro\n"
    assert "`healthRate`" in stale.read_text() and "old" not in stale.read_text()


# ---------------------------------------------------------------- bigpipe config check
@pytest.mark.parametrize("broken", [False, True])
def test_config_check_is_dash_config_check(tmp_path: Path, broken: bool) -> None:
    raw = copy.deepcopy(EXAMPLE)
    if broken:
        raw["kafka.consumer.list"][0]["rateLimit"] = 0
        raw["http.server.prot"] = 1
    path = tmp_path / "bigpipe.json"
    path.write_bytes(orjson.dumps(raw))
    new, old = bigpipe("config", "check", str(path)), bigpipe("-config", str(path), "--check")
    assert (new.returncode, new.stdout, new.stderr) == (old.returncode, old.stdout, old.stderr)
    assert new.returncode == (2 if broken else 0)
    if broken:
        assert new.stderr.splitlines() == [
            "bigpipe: config error: kafka.consumer.list[0].rateLimit: must be > 0, got 0; "
            "use a positive number",
            "bigpipe: config error: http.server.prot: unknown key; "
            "did you mean 'http.server.port'?",
        ]


def test_bigpipe_config_without_a_command_is_a_usage_error() -> None:
    result = bigpipe("config")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "schema" in result.stderr


# ---------------------------------------------------------------- declarations
def test_restart_keys_are_the_http_server_keys_as_in_the_original() -> None:
    # and the call status's, new: its writer, view and file are made when a node starts
    http = {key for key in fields_of(Config) if key.startswith(("http.server.", "status."))}
    assert set(RESTART_FIELDS.values()) == http
    refused = [
        k for k, info in fields_of(Config).items() if metadata(info, Key)[0].reload is REFUSED
    ]
    assert refused == ["kafka.bootstrap.servers"]


def test_non_finite_numbers_are_refused() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.consumer.list"][0]["rateLimit"] = float("inf")
    assert problems_of(raw) == [
        "kafka.consumer.list[0].rateLimit: must be a finite number, got inf"
    ]


def test_null_is_no_way_to_leave_a_key_out() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.consumer.list"][1]["circuitBreaker"] = None
    raw["kafka.topics"][0]["minInsyncReplicas"] = None
    assert problems_of(raw) == [
        "kafka.topics[0].minInsyncReplicas: must be an integer, got null",
        "kafka.consumer.list[1].circuitBreaker: must be an object, got null",
    ]


def test_rules_across_entries_are_reported_with_every_other_problem() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["http.server.port"] = "10086"
    raw["kafka.producer.acl"][0] = {"name": "system-1", "topic": "nope", "denyPrivate": 1}
    raw["kafka.producer.acl"][1]["name"] = "system-1"
    raw["kafka.consumer.list"][1].update(groupId="G1", retries=-1)
    assert sorted(problems_of(raw)) == sorted(
        [
            "http.server.port: must be an integer, got a string",
            "kafka.producer.acl[0].denyPrivate: must be true or false, got an integer",
            "kafka.producer.acl[0].secret: is missing; add it (or secret_sha256)",
            "kafka.producer.acl[0].topic: 'nope' is not in kafka.topics; "
            "add it there or fix the name",
            "kafka.producer.acl[1].name: duplicate ACL name 'system-1'; names must be unique",
            "kafka.consumer.list[1].retries: must be >= 0, got -1; use 0 or more",
            "kafka.consumer.list[1]: duplicate (topic, groupId) ('test', 'G1'); "
            "each consumer group may be listed once per topic",
        ]
    )


def test_every_bad_allow_entry_is_named() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.producer.acl"][1]["allow"] = ["ftp://x/", 5, "*.example.com"]
    assert problems_of(raw) == [
        "kafka.producer.acl[1].allow[0]: 'ftp://x/' must be an absolute http:// or https:// URL "
        "prefix",
        "kafka.producer.acl[1].allow[1]: must be a string, got an integer",
    ]


# ---------------------------------------------------------------- cost
def test_a_reload_with_a_200_entry_acl_validates_in_under_50_ms() -> None:
    raw = copy.deepcopy(EXAMPLE)
    raw["kafka.producer.acl"] = [
        {
            "name": f"caller-{i}",
            "secret": f"secret {i}",
            "topic": "test",
            "allow": ["https://api.example.com/hooks/", "*.example.com", f"svc-{i}.internal"],
            "denyPrivate": i % 2 == 0,
        }
        for i in range(200)
    ]
    running = parse_config(raw)
    source = REPO / "config" / "bigpipe.json"
    took = []
    for _ in range(7):
        started = time.perf_counter()
        check_reload(running, json.loads(json.dumps(raw)), source)  # librdkafka's checks too
        took.append(time.perf_counter() - started)
    assert statistics.median(took) < 0.050, took
