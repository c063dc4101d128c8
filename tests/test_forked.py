"""bigpipe.node.forked: work in a forked child, as the supervisor checks its config."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO

# A supervisor's situation: an event loop with signal handlers (they share one wake-up
# pipe with any forked child), and a child that gets SIGTERM while it works, as a
# `killall bigpipe` during a reload would give it.
SIGNALLED_CHILD = """
import asyncio, logging, os, signal, sys, time
import uvloop
from bigpipe.node.forked import in_child

def work():
    logging.getLogger("bigpipe.test").warning("from the child")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # time enough for a signal to be handled, if it were
    return {"pid": os.getpid()}

async def main():
    loop = asyncio.get_running_loop()
    terms = []
    loop.add_signal_handler(signal.SIGTERM, terms.append, 1)
    answer = in_child(work)
    await asyncio.sleep(0.3)  # the loop reads its wake-up pipe
    answer.log()
    print(answer.result["pid"] != os.getpid(), len(terms))

logging.basicConfig(format="%(name)s %(levelname)s %(message)s", stream=sys.stdout)
uvloop.run(main())  # as the supervisor runs
"""


def test_a_signal_to_the_child_never_reaches_the_parent_and_its_lines_do() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGNALLED_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    assert done.stdout.splitlines() == ["bigpipe.test WARNING from the child", "True 0"]
