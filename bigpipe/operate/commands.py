"""The operator's commands: `bigpipe dlq list|show|redrive`, `bigpipe replay`, `bigpipe top`,
`bigpipe status`, `bigpipe config schema|docs|check`, `bigpipe completion bash|zsh|tcsh`.

Each reads the node's config file for the cluster, the topics and the groups, and
talks to Kafka (or, for top, to the nodes) directly: no node needs to be running
for dlq and replay. Tables are for people; `--json` prints one JSON object per
line, for scripts. Exit codes: 0 done, 1 failed at run time (Kafka unreachable,
a write refused), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import KafkaException

from bigpipe.config import Config, ConfigError
from bigpipe.node.preflight import load_checked
from bigpipe.operate.selection import FILTER_NAMES, Filters, SelectionError, parse_filters

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Failed(RuntimeError):
    """A command that could not do its work; the text says what happened."""


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-config",
        "--config",
        default="config/bigpipe.json",
        help="the node's JSON config: cluster, topics and groups (default: %(default)s)",
    )


def add_filters(parser: argparse.ArgumentParser, *, dead_letters: bool) -> None:
    group = parser.add_argument_group("filters (all given must match)")
    group.add_argument(
        "--group",
        action="append",
        metavar="G",
        help="consumer group id, or topic/groupId; repeat for several (default: all)",
    )
    group.add_argument(
        "--since",
        metavar="T",
        help="from this time: RFC 3339, Unix ms, or a duration ago (15m, 2h, 7d)",
    )
    group.add_argument("--until", metavar="T", help="before this time (same forms)")
    group.add_argument("--url-prefix", metavar="P", help="the call's URL starts with P")
    group.add_argument("--host", metavar="H", help="the call's destination host is H")
    group.add_argument("--caller", metavar="NAME", help="the ACL name that posted the call")
    if dead_letters:
        group.add_argument("--status", metavar="N", help="the last attempt's HTTP status")
        group.add_argument("--error", metavar="TEXT", help="text in the last error")


def add_resend_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that write calls back (dlq redrive, replay)."""
    parser.add_argument("--to-url", metavar="URL", help="send to URL instead of each call's own")
    parser.add_argument("--dry-run", action="store_true", help="say what would be sent; send none")
    parser.add_argument("--rate", type=float, default=None, help="at most N calls per second")
    parser.add_argument("--json", action="store_true", help="the summary as one JSON object")


def checked_rate(args: argparse.Namespace) -> float | None:
    if args.rate is not None and args.rate <= 0:
        raise SelectionError("--rate: must be > 0")
    return args.rate


def filters_from(args: argparse.Namespace) -> Filters:
    return parse_filters({name: getattr(args, name, None) for name in FILTER_NAMES})


def parser() -> argparse.ArgumentParser:
    from bigpipe import config_docs
    from bigpipe.operate import completion, dlq_commands, replay, status, top

    root = argparse.ArgumentParser(prog="bigpipe", description="Bigpipe's operator commands.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dlq_commands.add_parser(commands)
    replay.add_parser(commands)
    top.add_parser(commands)
    status.add_parser(commands)
    config_docs.add_parser(commands)
    completion.add_parser(commands)
    return root


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (SelectionError, ConfigError) as exc:
        for problem in getattr(exc, "problems", None) or [str(exc)]:
            print(f"bigpipe: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except (Failed, KafkaException, OSError) as exc:
        print(f"bigpipe {args.command}: {_reason(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def _reason(exc: Exception) -> str:
    if isinstance(exc, KafkaException) and exc.args and hasattr(exc.args[0], "str"):
        return f"Kafka: {exc.args[0].str()}"
    return str(exc)


def load_config(args: argparse.Namespace) -> Config:
    try:
        _, config = load_checked(args.config)
    except ConfigError as exc:
        exc.problems = [f"config error: {p}" for p in exc.problems]
        raise
    return config


# ---------------------------------------------------------------- output
def print_json_lines(rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    for row in rows:
        sys.stdout.write(orjson.dumps(row).decode() + "\n")
        count += 1
    return count


def utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def cut(text: Any, width: int) -> str:
    text = "-" if text in (None, "") else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def progress_printer(verb: str) -> Callable[[int, int], None]:
    """Progress on stderr: one updating line on a terminal, else a line per step."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        line = f"{verb} {done}/{total}"
        print(
            ("\r" + line) if tty else line,
            end="" if tty and done < total else "\n",
            file=sys.stderr,
            flush=True,
        )

    return show
