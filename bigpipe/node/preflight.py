"""Checks of a parsed config that only the Kafka library can make: librdkafka's settings.

config.py checks the shape of `kafka.client.config`; whether librdkafka knows a
setting and accepts its value, alone and together with the settings Bigpipe adds
(idempotence, message sizes, ...), only librdkafka can say. Building a client
tells: an unknown or invalid setting fails at once, before any connection.
Run at `--check`, at start-up and on reload, so a bad setting is one line and
exit 2, never a traceback at start or a half-applied reload.

A process that has not loaded librdkafka (a supervisor, always) builds the clients in
a forked child: the library and the threads and buffers of the clients would otherwise
stay in it for good, about 6 MiB of a supervisor's RSS. A process that has loaded it
builds them itself: librdkafka's running threads make a fork unsafe.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import orjson

from bigpipe.config import Config, ConfigError, parse_config, read_config_file
from bigpipe.kafka import consumer_settings, producer_settings

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
        return _check_clients_in_child(config)
    except OSError:  # no fork (out of processes or memory): check here after all
        return check_clients_here(config)


def _check_clients_in_child(config: Config) -> list[str]:
    """check_clients_here in a forked child, which reports its problems through a pipe.

    The child is born with every signal blocked, and exits with them pending: it shares
    the supervisor's name and its event loop's signal wake-up pipe, so a `killall
    bigpipe` that caught it would otherwise reach the supervisor a second time (and a
    second SIGTERM means "skip the drain").
    """
    read_end, write_end = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:
            _report_from_child(config, read_end, write_end)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # only the parent comes here
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        answer = report.read()
    _, status = os.waitpid(pid, 0)
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        return [f"kafka.client.config: librdkafka's check of the settings failed (exit {code})"]
    return list(orjson.loads(answer))


def _report_from_child(config: Config, read_end: int, write_end: int) -> NoReturn:
    """The forked child: write the problems to the pipe and exit, never returning into
    the parent's code or running its exit handlers."""
    code = 1
    try:
        os.close(read_end)
        with os.fdopen(write_end, "wb") as report:
            report.write(orjson.dumps(check_clients_here(config)))
        code = 0
    finally:
        os._exit(code)


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
