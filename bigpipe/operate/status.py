"""`bigpipe status ID`: a call's status, asked of a node's `GET /rpc/call/{id}`.

Exit codes: 0 found; 1 not found, or the node unreachable or not ready; 2 bad usage
(no credentials, or credentials the node refuses).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson

from bigpipe.operate.commands import EXIT_FAILED, EXIT_OK, Failed, cut, utc
from bigpipe.operate.selection import SelectionError
from bigpipe.operate.top import node_url

TIMEOUT_SECONDS = 10.0
ROW = "  {:>3}  {:<24} {:>6} {:>8}  {:>11}  {}"  # an attempt: #, at, status, ms, retry-after, error


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "status",
        help="a call's state per group, its attempts and outcome, from a node",
        description="Look a call up through a node's GET /rpc/call/{id}, as its caller.",
    )
    parser.add_argument("id", help="the call id (data.id of the /rpc/call reply)")
    parser.add_argument(
        "--node",
        default="127.0.0.1:10086",
        help="host:port or URL of any node (default: %(default)s)",
    )
    parser.add_argument(
        "--name",
        default=os.environ.get("BIGPIPE_NAME"),
        help="the caller's ACL name (default: $BIGPIPE_NAME)",
    )
    parser.add_argument(
        "--secret",
        default=os.environ.get("BIGPIPE_SECRET"),
        help="its secret (default: $BIGPIPE_SECRET, which keeps it out of `ps`)",
    )
    parser.add_argument("--json", action="store_true", help="print the reply's data as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.name or args.secret is None:
        raise SelectionError(
            "status: give the caller's --name and --secret (or BIGPIPE_NAME, BIGPIPE_SECRET)"
        )
    status, reply = fetch(node_url(args.node), args.id, args.name, args.secret)
    if status == 401:
        raise SelectionError(f"status: the node refused the credentials: {reply.get('msg')}")
    if status != 200:
        print(f"bigpipe status: {reply.get('msg', f'HTTP {status}')}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        sys.stdout.write(orjson.dumps(reply["data"]).decode() + "\n")
    else:
        sys.stdout.write(render(reply["data"]))
    return EXIT_OK


def fetch(base: str, call_id: str, name: str, secret: str) -> tuple[int, dict[str, Any]]:
    """The node's HTTP status and JSON reply; Failed when it cannot be reached."""
    request = urllib.request.Request(f"{base}/rpc/call/{urllib.request.quote(call_id, safe='')}")
    credentials = base64.b64encode(f"{name}:{secret}".encode()).decode()
    request.add_header("Authorization", f"Basic {credentials}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            return error.code, orjson.loads(error.read())
        except orjson.JSONDecodeError:
            return error.code, {"msg": f"HTTP {error.code} from {base}"}
    except (urllib.error.URLError, OSError, orjson.JSONDecodeError) as exc:
        raise Failed(f"node {base} not reachable: {getattr(exc, 'reason', exc)}") from None


def render(data: dict[str, Any]) -> str:
    """The call, then per group its state, outcome and one line per attempt."""
    lines = [f"call      {data['id']}", f"accepted  {utc(data.get('accepted'))}"]
    if data.get("topic"):
        lines.append(f"topic     {data['topic']}")
    if data.get("due"):
        lines.append(f"due       {utc(data['due'])}")
    for group, status in data["groups"].items():
        lines += ["", f"group {group}: {_state(status)}"]
        if status["attempts"]:
            lines.append(ROW.format("#", "at", "status", "ms", "retry-after", "error"))
        for attempt in status["attempts"]:
            lines.append(
                ROW.format(
                    attempt["attempt"],
                    utc(attempt["at"]),
                    cut(attempt["status"], 6),
                    f"{attempt['latency_ms']:.1f}",
                    cut(attempt.get("retry_after"), 11),
                    cut(attempt["error"], 60),
                )
            )
    return "\n".join(lines) + "\n"


def _state(status: dict[str, Any]) -> str:
    text = status["state"]
    if status.get("due"):
        text += f" until {utc(status['due'])}"
    outcome = status.get("outcome")
    if outcome is not None:
        text += f" at {utc(outcome['at'])}"
        where = outcome.get("deadLetter")
        if where is not None:
            place = "/".join(str(where[k]) for k in ("partition", "offset") if k in where)
            text += f"; dead letter in {where['topic']}" + (f" at {place}" if place else "")
        if outcome.get("error"):
            text += f"\n  error: {outcome['error']}"
    return text
