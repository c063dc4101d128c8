"""Running wrk (Debian's, /usr/bin/wrk) with bench/lua/rpc_call.lua and reading its figures.

wrk is closed-loop: each connection sends its next request when the reply to
the last one arrives, over keep-alive. The Lua script's done hook prints the
figures as one JSON line, so nothing here parses wrk's human-readable table.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import BenchError, stop_process

SCRIPT = Path(__file__).resolve().parent / "lua" / "rpc_call.lua"
MARKER = "BENCH_JSON "


@dataclass
class WrkResult:
    requests: int
    seconds: float
    socket_errors: dict[str, int]  # connect, read, write, timeout
    status_errors: int  # replies with status >= 400
    latency_ms: dict[str, float]  # p50, p75, p90, p99, p99.9, max, mean
    statuses: dict[int, int]  # only when counted
    bytes: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def check_all_ok(self, what: str) -> None:
        """Fail loudly if any reply was 4xx or 5xx (errno != 0) or any socket failed."""
        bad = {k: v for k, v in self.socket_errors.items() if v}
        if self.status_errors or bad:
            raise BenchError(
                f"{what}: {self.status_errors} of {self.requests} replies were not 2xx "
                f"(errno != 0), socket errors {bad or 'none'}"
            )
        if self.requests == 0:
            raise BenchError(f"{what}: wrk completed no request")

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rate_per_s": round(self.rate, 1),
            "latency_ms": self.latency_ms,
            "status_errors": self.status_errors,
            "socket_errors": self.socket_errors,
            "statuses": self.statuses,
            "reply_bytes_avg": round(self.bytes / max(1, self.requests), 1),
        }


async def run_wrk(
    url: str,
    body_file: Path,
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
    count_statuses: bool = False,
    timeout_s: int = 10,
) -> WrkResult:
    """`wrk -tT -cC -dDs` posting the body in `body_file` to `url`; bounded to D + 30 s."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk not found; install it: apt-get install -y wrk")
    args = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(SCRIPT),
        url,
        "--",
        str(body_file),
    ]
    if count_statuses:
        args.append("statuses")
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds + 30)
    except TimeoutError:
        raise BenchError(f"wrk did not finish within {seconds + 30:g} s") from None
    finally:
        await stop_process(process)
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith(MARKER)), None)
    if process.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({process.returncode}):\n{text}\n{err.decode()}")
    data = json.loads(line.removeprefix(MARKER))
    errors = data["errors"]
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        socket_errors={k: errors[k] for k in ("connect", "read", "write", "timeout")},
        status_errors=errors["status"],
        latency_ms={k: round(v / 1000, 3) for k, v in data["latency_us"].items()},
        statuses={int(k): v for k, v in data["statuses"].items()},
        bytes=data["bytes"],
    )
