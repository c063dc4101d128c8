#!/usr/bin/env python3
"""Readiness probe for the local Kafka cluster, speaking the Kafka wire protocol.

Stdlib only (it runs before any venv exists). An open TCP port is not proof a
broker is usable, so we ask every broker for cluster Metadata and require that
the answer lists every expected broker id. In KRaft the metadata only lists
*unfenced* brokers, so "all ids listed" means the cluster has a controller
quorum and every broker has registered and caught up.

Usage:
  kafka_ready.py wait --bootstrap H:P[,H:P...] --expect-ids 0,1,2
                      [--timeout 90] [--pids 123,456]
      Poll until every address answers Metadata listing all expected ids.
      Exit 0 when ready; 1 on timeout or when one of --pids died (so a broker
      that crashed on start-up fails fast instead of after the full timeout).
  kafka_ready.py metadata --bootstrap H:P [--topics t1,t2]
      Print one broker's Metadata answer as JSON (brokers, controller, topics
      with partition leader/replicas/isr). Exit 1 if it cannot be fetched.

Protocol notes: Kafka 4.0 removed many old request versions (KIP-896), so we
first send ApiVersions v0 (always supported: clients need it to negotiate),
then use the highest Metadata version in 4..8 the broker accepts. v4-v8 are
the newest *non-flexible* versions (v9+ use compact/tagged encodings), with
request header v1 and response header v0.
"""

import argparse
import json
import os
import socket
import struct
import sys
import time

API_METADATA = 3
API_VERSIONS = 18
CLIENT_ID = b"local-kafka-ready"


class ProtocolError(Exception):
    pass


# ---------------------------------------------------------------- encoding --


def _request(api_key, api_version, correlation_id, body):
    """Frame a request with header v1: key, version, correlation id, client id."""
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(CLIENT_ID)) + CLIENT_ID
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


class Reader:
    """Cursor over a response body (non-flexible encodings only)."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def _take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ProtocolError("truncated response")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def int8(self):
        return self._take(">b")

    def int16(self):
        return self._take(">h")

    def int32(self):
        return self._take(">i")

    def string(self):
        """STRING / NULLABLE_STRING: int16 length (-1 = null) + UTF-8 bytes."""
        length = self.int16()
        if length < 0:
            return None
        raw = self.data[self.pos : self.pos + length]
        if len(raw) != length:
            raise ProtocolError("truncated string")
        self.pos += length
        return raw.decode("utf-8")

    def array(self, read_item):
        """ARRAY: int32 count (-1 = null) followed by the items."""
        count = self.int32()
        return [] if count < 0 else [read_item() for _ in range(count)]


# ---------------------------------------------------------------- transport --


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def _call(sock, api_key, api_version, correlation_id, body):
    sock.sendall(_request(api_key, api_version, correlation_id, body))
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got_id,) = struct.unpack_from(">i", response, 0)  # response header v0
    if got_id != correlation_id:
        raise ProtocolError("correlation id mismatch")
    return Reader(response[4:])


def _pick_metadata_version(sock):
    """ApiVersions v0 -> highest Metadata version within 4..8 that the broker supports."""
    r = _call(sock, API_VERSIONS, 0, 1, b"")
    error = r.int16()
    if error != 0:
        raise ProtocolError(f"ApiVersions error code {error}")
    ranges = {}
    for _ in range(r.int32()):
        key, lo, hi = r.int16(), r.int16(), r.int16()
        ranges[key] = (lo, hi)
    if API_METADATA not in ranges:
        raise ProtocolError("broker does not offer Metadata")
    lo, hi = ranges[API_METADATA]
    version = min(hi, 8)
    if version < max(lo, 4):
        raise ProtocolError(f"no common Metadata version (broker offers {lo}..{hi})")
    return version


def _metadata_body(version, topics):
    # Topics: null array (-1) = all topics; an empty array = none (cheap probe).
    if topics is None:
        body = struct.pack(">i", -1)
    else:
        body = struct.pack(">i", len(topics))
        for name in topics:
            raw = name.encode("utf-8")
            body += struct.pack(">h", len(raw)) + raw
    body += b"\x00"  # AllowAutoTopicCreation=false (v4+)
    if version >= 8:
        body += b"\x00\x00"  # IncludeCluster/TopicAuthorizedOperations=false
    return body


def _parse_metadata(r, version):
    r.int32()  # throttle_time_ms
    brokers = r.array(
        lambda: {"id": r.int32(), "host": r.string(), "port": r.int32(), "rack": r.string()}
    )
    cluster_id = r.string()
    controller_id = r.int32()

    def partition():
        p = {"error": r.int16(), "partition": r.int32(), "leader": r.int32()}
        if version >= 7:
            p["leader_epoch"] = r.int32()
        p["replicas"] = r.array(r.int32)
        p["isr"] = r.array(r.int32)
        if version >= 5:
            p["offline"] = r.array(r.int32)
        return p

    def topic():
        t = {"error": r.int16(), "name": r.string(), "internal": bool(r.int8())}
        t["partitions"] = r.array(partition)
        if version >= 8:
            r.int32()  # topic_authorized_operations
        return t

    topics = r.array(topic)
    return {
        "cluster_id": cluster_id,
        "controller_id": controller_id,
        "brokers": sorted(brokers, key=lambda b: b["id"]),
        "topics": topics,
    }


def fetch_metadata(address, topics=(), timeout=3.0):
    """Return the parsed Metadata answer of one broker ('host:port')."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.settimeout(timeout)
        version = _pick_metadata_version(sock)
        reader = _call(sock, API_METADATA, version, 2, _metadata_body(version, topics))
        meta = _parse_metadata(reader, version)
        meta["metadata_version"] = version
        return meta


# ----------------------------------------------------------------- commands --


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists" for kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmd_wait(args):
    addresses = [a for a in args.bootstrap.split(",") if a]
    expected = {int(i) for i in args.expect_ids.split(",") if i != ""}
    pids = [int(p) for p in (args.pids or "").split(",") if p]
    deadline = time.monotonic() + args.timeout
    last_problem = "no attempt yet"
    while True:
        pending = []
        for address in addresses:
            try:
                got = {b["id"] for b in fetch_metadata(address)["brokers"]}
                if not expected <= got:
                    pending.append(
                        f"{address} lists brokers {sorted(got)}, want {sorted(expected)}"
                    )
            except (OSError, ProtocolError) as e:
                pending.append(f"{address}: {e}")
        if not pending:
            return 0
        last_problem = "; ".join(pending)
        dead = [p for p in pids if not _pid_alive(p)]
        if dead:
            dead_list = ",".join(map(str, dead))
            print(
                f"kafka_ready: broker process(es) {dead_list} exited during start-up"
                f" ({last_problem})",
                file=sys.stderr,
            )
            return 1
        if time.monotonic() >= deadline:
            print(f"kafka_ready: not ready after {args.timeout}s: {last_problem}", file=sys.stderr)
            return 1
        time.sleep(0.25)


def cmd_metadata(args):
    topics = None if args.topics is None else [t for t in args.topics.split(",") if t]
    address = args.bootstrap.split(",")[0]
    try:
        meta = fetch_metadata(address, topics=topics)
    except (OSError, ProtocolError) as e:
        print(f"kafka_ready: {address}: {e}", file=sys.stderr)
        return 1
    json.dump(meta, sys.stdout, indent=2)
    print()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Kafka Metadata readiness probe (stdlib only).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait until every broker lists all expected ids")
    w.add_argument("--bootstrap", required=True, help="host:port,...; each must answer")
    w.add_argument("--expect-ids", required=True, help="broker ids that must be listed, e.g. 0,1,2")
    w.add_argument("--timeout", type=float, default=90.0)
    w.add_argument("--pids", help="comma-separated pids; fail fast if one dies")
    m = sub.add_parser("metadata", help="print one broker's Metadata as JSON")
    m.add_argument("--bootstrap", required=True)
    m.add_argument("--topics", help="comma-separated topic names (default: all topics)")
    args = parser.parse_args(argv)
    return cmd_wait(args) if args.cmd == "wait" else cmd_metadata(args)


if __name__ == "__main__":
    sys.exit(main())
