"""`bigpipe dlq list|show|redrive`: the command-line face of bigpipe.operate.dlq."""

from __future__ import annotations

import argparse
import shutil
import sys
from itertools import islice
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bigpipe.operate.commands import (
    EXIT_FAILED,
    EXIT_OK,
    Failed,
    add_config,
    add_filters,
    add_resend_options,
    checked_rate,
    cut,
    filters_from,
    load_config,
    print_json_lines,
    progress_printer,
    utc,
)
from bigpipe.operate.dlq import DeadLetter, RedriveOptions, dead_letters, find, redrive
from bigpipe.operate.resend import ResendFailed
from bigpipe.operate.selection import Filters, SelectionError


def add_parser(commands: Any) -> None:
    dlq = commands.add_parser("dlq", help="list, show and redrive dead letters")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="the dead letters that match, oldest first")
    add_config(listing)
    add_filters(listing, dead_letters=True)
    listing.add_argument("--limit", type=int, default=None, help="show at most N")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(run=run_list)

    show = actions.add_parser("show", help="every dead letter of one call, whole")
    add_config(show)
    show.add_argument("id", help="the call id (X-Bigpipe-Call-Id)")
    show.add_argument("--group", action="append", metavar="G", help="only this group's")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(run=run_show)

    again = actions.add_parser(
        "redrive", help="send the matching calls again, each to the group it failed in"
    )
    add_config(again)
    add_filters(again, dead_letters=True)
    add_resend_options(again)
    again.add_argument(
        "--force", action="store_true", help="also send calls an earlier redrive already sent"
    )
    again.set_defaults(run=run_redrive)


def run_list(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise SelectionError(f"--limit: must be 0 or more, got {args.limit}")
    config = load_config(args)
    letters = islice(dead_letters(config, filters_from(args)), args.limit)
    if args.json:
        print_json_lines(letter.summary() for letter in letters)
        return EXIT_OK
    rows = [letter.summary() for letter in letters]
    table = Table(title=f"{len(rows)} dead letters", title_justify="left")
    for column in ("id", "group", "failed at (UTC)", "tries", "status", "last error", "url"):
        table.add_column(column, overflow="fold" if column in ("id", "url") else "ellipsis")
    for row in rows:
        table.add_row(
            cut(row["id"], 32),
            cut(f"{row['topic']}/{row['group']}", 40),
            utc(row["failedAt"]),
            str(row["attempts"]),
            cut(row["lastStatus"], 3),
            cut(row["lastError"], 60),
            cut(row["url"], 80),
        )
    _console().print(table)
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    config = load_config(args)
    found = find(config, args.id, Filters(groups=tuple(args.group or ())))
    if not found:
        raise Failed(f"no dead letter of call {args.id} in the groups' dead-letter topics")
    for letter in found:
        if args.json:
            print_json_lines([letter.detail()])
        else:
            print(orjson.dumps(letter.detail(), option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK


def run_redrive(args: argparse.Namespace) -> int:
    config = load_config(args)
    options = RedriveOptions(args.to_url, args.force, args.dry_run, checked_rate(args))
    letters: list[DeadLetter] = list(dead_letters(config, filters_from(args)))
    try:
        report = redrive(config, letters, options, progress_printer("redriven"))
    except ResendFailed as exc:
        print(
            f"bigpipe dlq redrive: {exc}; run it again: calls already sent are skipped",
            file=sys.stderr,
        )
        return EXIT_FAILED
    summary = report.as_dict()
    if args.json:
        print_json_lines([summary])
        return EXIT_OK
    verb = "would redrive" if report.dry_run else "redriven"
    print(
        f"{report.selected} dead letters selected; {verb} {report.redriven}; "
        f"{report.already} redriven before (--force sends them again); "
        f"{len(report.unredrivable)} cannot be redriven"
    )
    for item in report.unredrivable:
        print(f"  {item['id'] or item['deadLetter']}: {item['why']}")
    return EXIT_OK


def _console() -> Console:
    """Wide enough for the table when stdout is a pipe or a file, not just 80 columns."""
    width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else 200
    return Console(width=width, highlight=False)
