"""Shared pieces of the benchmarks: a local Kafka, nginx as a fast real downstream, results."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import LOCAL_KAFKA, REPO, free_port

BENCH_KAFKA_PORT = "19492"
BENCH_KAFKA_DIR = REPO / ".local" / "kafka-bench"
RESULTS = REPO / "bench" / "results"

NGINX_CONF = """
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 204; }}
    }}
}}
"""


def start_kafka() -> str:
    result = subprocess.run(
        [str(LOCAL_KAFKA), "start", "--port", BENCH_KAFKA_PORT, "--dir", str(BENCH_KAFKA_DIR)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return result.stdout.strip().splitlines()[-1]


def stop_kafka() -> None:
    subprocess.run(
        [str(LOCAL_KAFKA), "stop", "--dir", str(BENCH_KAFKA_DIR)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


@contextmanager
def nginx_204(workdir: Path) -> Iterator[str]:
    """nginx answering 204 to everything on a loopback port; yields its URL."""
    if shutil.which("nginx") is None:
        raise SystemExit("bench: nginx not found; install it: apt-get install -y nginx-light")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=workdir, port=port))
    process = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(port)
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        process.terminate()
        process.wait(10)


def _wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on port {port} after {timeout} s")


def median(values: list[float]) -> float:
    return statistics.median(values)


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
