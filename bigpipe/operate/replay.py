"""`bigpipe replay`: deliver again, to one group, the calls of a time window still in Kafka.

Kafka keeps every call for its topic's retention, so a receiver that lost a
day of data can have that day again. The window is found with offsets-for-times;
each call in it is written back to its topic for the one group named (the
envelope's `group`, as a redrive), marked `replay` (the downstream sees
`X-Bigpipe-Replay: 1`), with its own id. The running nodes then deliver it
through that group's shields: its rate limit, concurrency, breaker, retries
and its callers' destination rules. Blocking code.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from confluent_kafka import Message

from bigpipe.calls.envelope import Call, InvalidRecord, decode_call, envelope_of
from bigpipe.config import Config, ConsumerConfig
from bigpipe.ingest.compat import decode_go_record, is_go_record
from bigpipe.operate.commands import (
    EXIT_OK,
    Failed,
    add_config,
    add_filters,
    add_resend_options,
    checked_rate,
    filters_from,
    load_config,
    print_json_lines,
    progress_printer,
)
from bigpipe.operate.dlq import Progress
from bigpipe.operate.resend import Resender, paced
from bigpipe.operate.selection import Filters, SelectionError
from bigpipe.operate.topic_reader import TopicMissing, read_window


@dataclass
class ReplayReport:
    selected: int = 0  # calls in the window that match
    replayed: int = 0  # written back (on a dry run, 0)
    dry_run: bool = False
    ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "replayed": self.replayed,
            "dryRun": self.dry_run,
            "ids": self.ids,
        }


def the_group(config: Config, filters: Filters) -> ConsumerConfig:
    if len(filters.groups) != 1:
        raise SelectionError("--group: name exactly one consumer group to replay to")
    [group] = filters.choose_groups(config)  # choose_groups raises for an unknown one
    return group


def window(
    config: Config, group: ConsumerConfig, filters: Filters
) -> Iterator[tuple[Message, Call]]:
    """The group's calls written in [since, until) that match the filters, as read."""
    if filters.since_ms is None:
        raise SelectionError("--since: give the start of the window to replay")
    try:
        yield from _matching(config, group, filters)
    except TopicMissing:
        raise Failed(f"topic {group.topic} does not exist") from None


def _matching(
    config: Config, group: ConsumerConfig, filters: Filters
) -> Iterator[tuple[Message, Call]]:
    assert filters.since_ms is not None
    for message in read_window(config, group.topic, filters.since_ms, filters.until_ms):
        _, written_ms = message.timestamp()
        if filters.until_ms is not None and written_ms >= filters.until_ms:
            continue  # offsets-for-times bounds the window; the record's time decides
        if written_ms < filters.since_ms:
            continue
        call = _decode(message)
        if call is None or call.group is not None:
            # Not a call, or a copy an operator sent again (redrive, replay): the call
            # itself is in the log at its own time, so replaying copies would repeat it.
            continue
        if filters.matches_call({"url": call.url, "caller": call.caller}):
            yield message, call


def _decode(message: Message) -> Call | None:
    value = message.value()
    try:
        if is_go_record(value):
            where = (message.topic(), message.partition(), message.offset())
            return decode_go_record(value, *where)
        return decode_call(value)
    except InvalidRecord:
        return None  # its group dead-lettered it already; nothing to deliver


def replay(
    config: Config,
    filters: Filters,
    *,
    to_url: str | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    progress: Progress | None = None,
) -> ReplayReport:
    group = the_group(config, filters)
    report = ReplayReport(dry_run=dry_run)
    chosen = window(config, group, filters)
    if dry_run:
        report.ids = [call.id for _, call in chosen]
        report.selected = len(report.ids)
        return report
    resender = Resender(config)  # not before the window is known to be readable
    for chunk in paced(chosen, rate):
        records = [(group.topic, _again(call, group, to_url), m.key()) for m, call in chunk]
        resender.send(records, f"{len(chunk)} calls")
        report.selected = report.replayed = report.replayed + len(chunk)
        report.ids.extend(call.id for _, call in chunk)
        if progress is not None:
            progress(report.replayed, 0)  # the window's size is known only at its end
    return report


def _again(call: Call, group: ConsumerConfig, to_url: str | None) -> bytes:
    # Due now, with a fresh set of attempts (its ttl does not apply to a resend: Expiry).
    again = replace(
        call, group=group.group_id, replay=True, url=to_url or call.url, due_ms=0, attempts=0
    )
    return orjson.dumps(envelope_of(again))


# ---------------------------------------------------------------- command line
def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "replay", help="deliver a time window of a group's calls again, from Kafka"
    )
    add_config(parser)
    add_filters(parser, dead_letters=False)
    add_resend_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    report = replay(
        config,
        filters_from(args),
        to_url=args.to_url,
        dry_run=args.dry_run,
        rate=checked_rate(args),
        progress=progress_printer("replayed"),
    )
    if args.json:
        print_json_lines([report.as_dict()])
    else:
        verb = "would replay" if report.dry_run else "replayed"
        print(f"{report.selected} calls in the window; {verb} {report.replayed or report.selected}")
    return EXIT_OK
