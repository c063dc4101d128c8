"""`python -m bigpipe` and the `bigpipe` command.

SIGUSR1 is blocked before anything else runs. Its default action kills the
process, and `killall -USR1 bigpipe` or a supervisor's forwarded reload may come
at any moment, also while the heavy imports below take their second. Once the
reload handler exists it unblocks the signal (bigpipe.node.signals), and a reload
asked for meanwhile is applied then.
"""

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})


def main() -> int:
    from bigpipe.cli import main as run  # aiohttp, confluent_kafka, uvloop: after the block

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
