"""`bigpipe completion bash|zsh|tcsh`: a shell completion script for every command.

shtab writes it from the very argparse parsers the commands parse with, so the
completion cannot drift from the options; it runs once, when the script is made,
never when a shell completes a word.
"""

from __future__ import annotations

import argparse
from typing import Any

SHELLS = ("bash", "zsh", "tcsh")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for bash, zsh or tcsh; see the README "
        "(Operating it) for where to put it.",
    )
    parser.add_argument("shell", choices=SHELLS)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(whole_parser(), args.shell), end="")
    return 0


def whole_parser() -> argparse.ArgumentParser:
    """The operator commands' parser with the node's own options beside them."""
    import shtab

    from bigpipe.cli import add_node_options
    from bigpipe.operate.commands import parser

    root = parser()
    add_node_options(root)
    for each in _parsers(root):
        for action in each._actions:
            if action.dest == "config":  # every -config names a file
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    return root


def _parsers(root: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [root]
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.extend(_parsers(child))
    return found
