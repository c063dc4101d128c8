"""Checks of a parsed config that only the Kafka library can make: librdkafka's settings.

config.py checks the shape of `kafka.client.config`; whether librdkafka knows a
setting and accepts its value, alone and together with the settings Bigpipe adds
(idempotence, message sizes, ...), only librdkafka can say. Building a client
tells: an unknown or invalid setting fails at once, before any connection.
Run at `--check`, at start-up and on reload, so a bad setting is one line and
exit 2, never a traceback at start or a half-applied reload.

A process that has not loaded librdkafka builds the clients in a forked child
(bigpipe.node.forked): the library and the threads and buffers of the clients would
otherwise stay in it for good. A process that has loaded it builds them itself:
librdkafka's running threads make a fork unsafe.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from bigpipe.config import Config, ConfigError, parse_config, read_config_file
from bigpipe.kafka import consumer_settings, producer_settings
from bigpipe.node.forked import ChildFailed, in_child

# A client built only to be checked logs nothing: it is never polled, and it has no handler.
_QUIET = logging.getLogger("bigpipe.node.preflight.librdkafka")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
PROPERTY = re.compile(r'property:? "([^"]+)"')
CONFIGURATION_DOC = "librdkafka's CONFIGURATION.md"


def check_clients(config: Config) -> list[str]:
    """librdkafka's objections to the producer's and the consumers' settings, one line each."""
    if "confluent_kafka" in sys.modules:
        return check_clients_here(config)
    try:
        answer = in_child(lambda: check_clients_here(config))
        answer.log()
        return list(answer.result)
    except ChildFailed as exc:
        return [f"kafka.client.config: librdkafka's check of the settings failed ({exc})"]
    except OSError:  # no fork (out of processes or memory): check here after all
        return check_clients_here(config)


def check_clients_here(config: Config) -> list[str]:
    """check_clients in this process."""
    from confluent_kafka import Consumer, KafkaException  # see the module's docstring
    from confluent_kafka import Producer as KafkaProducer

    builds = [lambda: KafkaProducer(_quiet(producer_settings(config)))]
    if config.consumers:
        settings = _quiet(consumer_settings(config, config.consumers[0]))
        builds.append(lambda: Consumer(settings).close())
    problems: list[str] = []
    for build in builds:
        try:
            build()
        except KafkaException as exc:
            problem = _explain(config, exc.args[0].str())
            if problem not in problems:
                problems.append(problem)
    return problems


def _quiet(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "logger": _QUIET}


def _explain(config: Config, text: str) -> str:
    """librdkafka's message as a config error that names the key to fix."""
    match = PROPERTY.search(text)
    name = match.group(1) if match else None
    if name is not None and name in config.kafka_client_config:
        if text.startswith("No such configuration property"):
            return (
                f"kafka.client.config.{name}: librdkafka has no such setting; "
                f"fix its name or remove it (see {CONFIGURATION_DOC})"
            )
        return f"kafka.client.config.{name}: librdkafka refuses it: {text}"
    return f"kafka.client.config: librdkafka refuses the settings: {text} (see {CONFIGURATION_DOC})"


def parse_checked(raw: Any, source: Path | None = None) -> Config:
    """parse_config, then librdkafka's checks; ConfigError lists every problem."""
    config = parse_config(raw, source)
    if problems := check_clients(config):
        raise ConfigError(problems)
    return config


def load_checked(path: str | Path) -> tuple[Any, Config]:
    """A config file's JSON and its validated Config, as start-up and `--check` need them."""
    raw = read_config_file(path)
    return raw, parse_checked(raw, Path(path))
