"""`python -m bench`: the whole benchmark suite (see bench/suite.py)."""

import sys

from bench.suite import main

try:
    main()
except KeyboardInterrupt:  # Ctrl-C or SIGTERM, once what the run started has stopped
    print("bench: interrupted; what it started is stopped", file=sys.stderr)
    sys.exit(130)
