"""ConfigError: a config is unusable. Apart from bigpipe.config, whose pydantic models a
supervisor never loads (bigpipe.node.workers), so that it can still catch one."""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """Escape control characters (a key may hold a line break), so text stays on one line."""
    return CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class ConfigError(Exception):
    """The config is unusable; each entry of `problems` is one line for the operator."""

    def __init__(self, problems: list[str]) -> None:
        problems = list(dict.fromkeys(one_line(p) for p in problems))
        super().__init__("\n".join(problems))
        self.problems = problems
