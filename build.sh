#!/usr/bin/env bash
# build.sh: set up, run and test Bigpipe on a fresh machine.
#
#   ./build.sh          set up only: .venv with Bigpipe and its test tools, Kafka's jars
#   ./build.sh run      start a local Kafka if none answers, then run Bigpipe in the foreground
#   ./build.sh test     run the test suite against a Kafka of its own (port 19092, or a free one)
#   ./build.sh faults   run the fault-injection suite (3-broker Kafka, crash loops, overload,
#                       network faults through Toxiproxy)
#   ./build.sh soak [--minutes M] [--fault-every S] [--rate R]
#                       30 minutes (or M) of traffic through two nodes under rolling faults
#   ./build.sh bench    run the benchmarks (bench/), each against a same-run baseline
#   ./build.sh lint     ruff over the package, the tests and the benchmarks
#
# Every step is idempotent; a re-run with nothing changed takes about a second.
# Exit codes: the command's own (pytest's for `test`), 3 when a prerequisite is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
readonly ROOT=$PWD
readonly VENV=$ROOT/.venv
readonly LOCAL_KAFKA=$ROOT/deploy/kafka/local-kafka
readonly CONFIG=${BIGPIPE_CONFIG:-$ROOT/config/bigpipe.json}
readonly TEST_KAFKA_PORT=19092 # and 20092 for its controller
readonly TEST_KAFKA_DIR=$ROOT/.local/kafka-test
readonly TOXIPROXY_VERSION=v2.5.0 # Shopify's TCP fault proxy, for the network fault tests
readonly TOXIPROXY=$ROOT/.local/bin/toxiproxy-server

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 3; }

# ------------------------------------------------------------------ prerequisites
find_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  die "Python 3.11+ not found; install it (e.g. apt-get install -y python3 python3-venv)"
}

java_ok() {
  command -v java >/dev/null || return 1
  local major
  major=$(java -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')
  [[ ${major%%.*} -ge 17 ]]
}

# Java 17+ and Maven run the broker and fetch its jars. As root, install them with apt-get.
ensure_java_and_maven() {
  if java_ok && command -v mvn >/dev/null; then
    return
  fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing Java 17 and Maven with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
  fi
  java_ok || die "java 17+ not found; install it: apt-get install -y openjdk-17-jre-headless"
  command -v mvn >/dev/null || die "mvn not found; install it: apt-get install -y maven"
}

# Debian packages that tests and benchmarks use: Chromium for the dashboard test, nginx
# as a fast real downstream and for the load-balancer example, wrk for load, tmux as the
# real terminal `bigpipe top` is tested in. In CI, or as
# root, a tool that cannot be installed is an error: a skipped test would hide it. Only
# a developer's machine without root skips the tests that need a missing tool.
missing_test_tools() {
  local missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v tmux >/dev/null || missing+=(tmux)
  echo "${missing[*]}"
}

ensure_test_tools() {
  local missing
  missing=$(missing_test_tools)
  [[ -z $missing ]] && return
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing $missing with apt-get"
    # shellcheck disable=SC2086 # one word per package
    apt-get update -qq >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $missing >/dev/null || true
    missing=$(missing_test_tools)
    [[ -z $missing ]] && return
  fi
  if [[ -n ${CI:-} || $(id -u) -eq 0 ]]; then
    die "could not install the test tools $missing (apt-get install -y $missing)"
  fi
  say "missing $missing: the tests and benchmarks that need them will be skipped"
}

# Go builds Toxiproxy. As root, install Debian's golang-go when no Go is found.
find_go() {
  local candidate
  for candidate in "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [[ -n $candidate && -x $candidate ]] && { echo "$candidate"; return; }
  done
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing Go with apt-get (to build Toxiproxy)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go >/dev/null
    command -v go && return
  fi
  die "go not found; install it (apt-get install -y golang-go) to build Toxiproxy"
}

# Toxiproxy $TOXIPROXY_VERSION in .local/bin, built from source with `go install` (the module
# proxy checks its sum). The stamp beside it records the version, since the binary reports
# none. Its command is cmd/server: installed as `server`, it is renamed toxiproxy-server.
ensure_toxiproxy() {
  local stamp=$TOXIPROXY.version gobin
  [[ -x $TOXIPROXY && -f $stamp && $(cat "$stamp") == "$TOXIPROXY_VERSION" ]] && return
  say "building Toxiproxy $TOXIPROXY_VERSION with go install (a minute or two the first time)"
  mkdir -p "$ROOT/.local"
  gobin=$(mktemp -d "$ROOT/.local/toxiproxy-build.XXXXXX")
  if ! GOBIN=$gobin "$(find_go)" install \
    "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION" >"$gobin.log" 2>&1; then
    cat "$gobin.log" >&2
    rm -rf "$gobin" "$gobin.log"
    die "go install of Toxiproxy $TOXIPROXY_VERSION failed (log above)"
  fi
  mkdir -p "${TOXIPROXY%/*}"
  mv "$gobin/server" "$TOXIPROXY"
  echo "$TOXIPROXY_VERSION" >"$stamp"
  rm -rf "$gobin" "$gobin.log"
}

# ------------------------------------------------------------------ set-up
setup_venv() {
  local stamp=$VENV/.bigpipe-stamp want
  want=$(sha256sum <pyproject.toml | cut -d' ' -f1)
  if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
    return
  fi
  say "creating .venv and installing Bigpipe with its test tools"
  "$(find_python)" -m venv "$VENV"
  if ! "$VENV/bin/pip" install -q -e '.[test]' >"$VENV/pip.log" 2>&1; then
    cat "$VENV/pip.log" >&2
    die "pip could not install Bigpipe (log above, also in .venv/pip.log)"
  fi
  echo "$want" >"$stamp"
}

setup() {
  setup_venv
  ensure_java_and_maven
  "$LOCAL_KAFKA" fetch
}

# ------------------------------------------------------------------ commands
config_bootstrap() {
  "$VENV/bin/python" -c 'import sys, json; print(json.load(open(sys.argv[1]))["kafka.bootstrap.servers"])' "$CONFIG"
}

cmd_run() {
  setup
  "$VENV/bin/bigpipe" -config "$CONFIG" --check >/dev/null || exit 2
  local bootstrap first port
  bootstrap=$(config_bootstrap)
  first=${bootstrap%%,*}
  if python3 "$ROOT/deploy/kafka/kafka_ready.py" metadata --bootstrap "$first" >/dev/null 2>&1; then
    say "Kafka answers at $first"
  else
    port=${first##*:}
    say "no Kafka at $first; starting the local one (deploy/kafka/local-kafka start --port $port)"
    "$LOCAL_KAFKA" start --port "$port" >/dev/null
  fi
  say "running bigpipe -config $CONFIG (Ctrl-C drains and stops it)"
  exec "$VENV/bin/bigpipe" -config "$CONFIG"
}

# The test broker's port: 19092, unless another program (say, the test broker of
# another checkout) holds it or its controller port; then any free pair.
test_kafka_port() {
  "$VENV/bin/python" - "$TEST_KAFKA_PORT" <<'PY'
import socket, sys

def free(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0

port = int(sys.argv[1])
while not (free(port) and free(port + 1000)):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1] % 20000 + 21000
print(port)
PY
}

cmd_test() {
  setup
  ensure_test_tools
  ensure_toxiproxy
  local status=0 bootstrap
  if "$LOCAL_KAFKA" status --dir "$TEST_KAFKA_DIR" >/dev/null 2>&1; then
    # Already running (say, a bare pytest left it): reuse it on whatever port it has.
    bootstrap=$("$LOCAL_KAFKA" start --dir "$TEST_KAFKA_DIR" | tail -n 1)
  else
    bootstrap=$("$LOCAL_KAFKA" start --port "$(test_kafka_port)" --dir "$TEST_KAFKA_DIR" | tail -n 1)
    trap '"$LOCAL_KAFKA" stop --dir "$TEST_KAFKA_DIR" >/dev/null' EXIT
  fi
  BIGPIPE_TEST_BOOTSTRAP=$bootstrap "$VENV/bin/python" -m pytest "$@" || status=$?
  return "$status"
}

cmd_faults() { # the fault tests start their own brokers: no test broker here
  setup
  ensure_test_tools
  ensure_toxiproxy
  "$VENV/bin/python" -m pytest tests/faults -m faults "$@"
}

cmd_soak() { # not in CI: 30 minutes; it starts its own brokers like the fault tests
  setup
  ensure_toxiproxy
  "$VENV/bin/python" -m tests.faults.soak "$@"
}

cmd_bench() {
  setup
  ensure_test_tools
  "$VENV/bin/python" -m bench "$@"
}

cmd_lint() {
  setup_venv
  "$VENV/bin/ruff" check bigpipe tests bench
  "$VENV/bin/ruff" format --check bigpipe tests bench
}

main() {
  local command=${1:-setup}
  [[ $# -gt 0 ]] && shift
  case $command in
    setup) setup ;;
    run) cmd_run "$@" ;;
    test) cmd_test "$@" ;;
    faults) cmd_faults "$@" ;;
    soak) cmd_soak "$@" ;;
    bench) cmd_bench "$@" ;;
    lint) cmd_lint ;;
    -h | --help | help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) say "unknown command '$command'; use one of: run, test, faults, soak, bench, lint"; exit 2 ;;
  esac
}

main "$@"
