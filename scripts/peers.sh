#!/usr/bin/env bash
# Redis, etcd and ZooKeeper on loopback, for benchmarking latchkey against
# the lock services people already use.
#
#   scripts/peers.sh install   Debian's packages (and protoc for the etcd client crate)
#   scripts/peers.sh start     all three on 127.0.0.1, fresh data, waits until each answers
#   scripts/peers.sh status    which are running, their versions and addresses
#   scripts/peers.sh stop      stops them and removes their folders
#   scripts/peers.sh bench [ARGS]   the lock benchmark, latchkey beside all three
#   scripts/peers.sh smoke [ARGS]   each peer's lock checked, and timed briefly
#
# bench and smoke start whichever peers are not running, build and run the
# benches/peers package (ARGS go to the bench: --quick for a short run), and
# stop again only the peers they started. They build into the repository's
# target/ folder unless CARGO_TARGET_DIR says otherwise.
#
# Each peer runs from its own folder under $LATCHKEY_PEERS_DIR (default
# ${TMPDIR:-/tmp}/latchkey-peers): data/, its config, log and pid. Nothing
# is persisted: each start begins from empty data. Give status and stop the
# same LATCHKEY_PEERS_DIR as start. Ports can be moved with PEERS_REDIS_PORT
# (6379), PEERS_ETCD_PORT (2379), PEERS_ETCD_PEER_PORT (2380) and
# PEERS_ZK_PORT (2181); the bench finds moved peers through
# LATCHKEY_PEER_REDIS, LATCHKEY_PEER_ETCD and LATCHKEY_PEER_ZOOKEEPER
# (IP:port). No variable here starts with ETCD_: etcd reads those as flags.
#
# The services are started by hand, never through the init system, and every
# one listens on 127.0.0.1 only: start checks this and fails if not.
set -euo pipefail

HOST=127.0.0.1
ROOT=${LATCHKEY_PEERS_DIR:-${TMPDIR:-/tmp}/latchkey-peers}
REDIS_PORT=${PEERS_REDIS_PORT:-6379}
ETCD_PORT=${PEERS_ETCD_PORT:-2379}
ETCD_PEER_PORT=${PEERS_ETCD_PEER_PORT:-2380}
ZK_PORT=${PEERS_ZK_PORT:-2181}
# A JVM on 2 shared cores can take a while to come up; etcd and Redis need
# well under a second.
WAIT_SECS=${PEERS_WAIT_SECS:-60}
PEERS=(redis etcd zookeeper)

# etcd-client holds etcdctl; the etcd-client crate's build needs protoc and
# the well-known .proto files; iproute2's ss lets start check that every
# peer listens on loopback only.
PACKAGES=(redis-server redis-tools etcd-server etcd-client zookeeper protobuf-compiler libprotobuf-dev iproute2)

say() { printf '%s\n' "$*"; }
die() {
  printf 'peers.sh: %s\n' "$*" >&2
  exit 1
}

cmd_install() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "all installed: ${PACKAGES[*]}"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "installing ${missing[*]} needs root (run as root or through sudo)"
  say "installing: ${missing[*]}"
  # Debian's maintainer scripts would start each service through the init
  # system; a policy-rc.d that answers 101 ("action forbidden") stops that.
  # Only a policy we wrote ourselves is removed afterwards.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  local status=0
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends "${missing[@]}"
  ) || status=$?
  if [ "$own_policy" -eq 1 ]; then rm -f "$policy"; fi
  [ "$status" -eq 0 ] || die "apt-get install ${missing[*]} failed (exit $status); see apt's output above"
  say "installed: ${missing[*]}"
}

# --- helpers ---------------------------------------------------------------

dir_of() { printf '%s/%s' "$ROOT" "$1"; }
port_of() {
  case "$1" in
    redis) printf '%s' "$REDIS_PORT" ;;
    etcd) printf '%s' "$ETCD_PORT" ;;
    zookeeper) printf '%s' "$ZK_PORT" ;;
  esac
}
pid_of() {
  local file
  file="$(dir_of "$1")/pid"
  [ -f "$file" ] && cat "$file"
}
# The process name each peer runs as, so that a pid reused by an unrelated
# process after a reboot or crash is not taken for the peer.
comm_of() {
  case "$1" in
    redis) printf 'redis-server' ;;
    etcd) printf 'etcd' ;;
    zookeeper) printf 'java' ;;
  esac
}
alive() {
  local pid
  pid=$(pid_of "$1") || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(comm_of "$1")" ]
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Sends a ZooKeeper four-letter word and prints the answer.
zk_word() {
  local answer
  answer=$(
    exec 2>/dev/null
    exec 3<>"/dev/tcp/$HOST/$ZK_PORT" || exit 1
    printf '%s' "$1" >&3
    timeout 5 cat <&3
  ) || return 1
  printf '%s' "$answer"
}

# True once the peer answers its own health check.
answers() {
  case "$1" in
    redis) [ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] ;;
    etcd) ETCDCTL_API=3 etcdctl --endpoints="$HOST:$ETCD_PORT" --command-timeout=2s endpoint health >/dev/null 2>&1 ;;
    # ruok says imok before the server serves requests; srvr does not.
    zookeeper) [[ "$(zk_word srvr)" == *"Zookeeper version:"* ]] ;;
  esac
}

version_of() {
  case "$1" in
    redis) redis-cli -h "$HOST" -p "$REDIS_PORT" info server 2>/dev/null |
      sed -n 's/^redis_version:\([^[:space:]]*\).*/\1/p' ;;
    etcd) ETCDCTL_API=3 etcdctl --endpoints="$HOST:$ETCD_PORT" --command-timeout=2s endpoint status -w json 2>/dev/null |
      sed -n 's/.*"version":"\([^"]*\)".*/\1/p' ;;
    zookeeper) zk_word srvr | sed -n 's/^Zookeeper version: \([^-,]*\).*/\1/p' ;;
  esac
}

# Every TCP and UDP socket the process listens on, as ADDR:PORT lines
# (needs ss).
listening_of() {
  { ss -Hltnp; ss -Hlunp; } 2>/dev/null | awk -v pid="pid=$1," 'index($0, pid) { print $4 }'
}

# Who listens on 127.0.0.1:$1, as ss shows it, for an error message.
holder_of() {
  command -v ss >/dev/null 2>&1 || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/ (held by \1)/p' | head -n 1
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "$2: $1 is missing (run scripts/peers.sh install)"
}

# --- start -----------------------------------------------------------------

launch_redis() {
  local dir=$1
  need redis-server redis
  need redis-cli redis
  # --save '' and --appendonly no: nothing is written to disk. Protected
  # mode stays on; it only matters off loopback anyway.
  setsid redis-server --bind "$HOST" --port "$REDIS_PORT" --save '' --appendonly no \
    --dir "$dir/data" --daemonize no --logfile '' \
    </dev/null >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
}

launch_etcd() {
  local dir=$1
  need etcd etcd
  need etcdctl etcd
  setsid etcd --name latchkey-peer --data-dir "$dir/data" \
    --listen-client-urls "http://$HOST:$ETCD_PORT" --advertise-client-urls "http://$HOST:$ETCD_PORT" \
    --listen-peer-urls "http://$HOST:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster "latchkey-peer=http://$HOST:$ETCD_PEER_PORT" --initial-cluster-state new \
    --logger zap --log-outputs stderr \
    </dev/null >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
}

launch_zookeeper() {
  local dir=$1
  need java zookeeper
  [ -f /usr/share/java/zookeeper.jar ] || die "zookeeper: /usr/share/java/zookeeper.jar is missing (run scripts/peers.sh install)"
  # maxClientCnxns=0: the default of 60 per address would refuse a bench
  # with many clients, all from 127.0.0.1. No admin server (it would listen
  # on 8080 on every address); srvr for the health check and the version.
  cat >"$dir/zoo.cfg" <<CFG
tickTime=2000
dataDir=$dir/data
clientPort=$ZK_PORT
clientPortAddress=$HOST
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=srvr
CFG
  # Debian's zookeeper.jar lists its dependencies in its manifest but ships
  # no slf4j binding; slf4j-simple sends the log to stderr, here the log file.
  # Started without zkServer.sh, whose JMX defaults we do not want.
  local classpath=/usr/share/java/zookeeper.jar
  [ -f /usr/share/java/slf4j-simple.jar ] && classpath="$classpath:/usr/share/java/slf4j-simple.jar"
  setsid java -Xmx512m -Djava.net.preferIPv4Stack=true -cp "$classpath" -Dzookeeper.log.dir="$dir" \
    org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg" \
    </dev/null >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
}

fail_peer() {
  local peer=$1 why=$2 dir
  dir=$(dir_of "$peer")
  printf 'peers.sh: %s failed: %s\n' "$peer" "$why" >&2
  if [ -f "$dir/log" ]; then
    printf 'peers.sh: %s log: %s (last lines below)\n' "$peer" "$dir/log" >&2
    tail -n 15 "$dir/log" | sed 's/^/    /' >&2
  fi
  FAILED+=("$peer")
}

start_one() {
  local peer=$1 dir port pid addr
  dir=$(dir_of "$peer")
  port=$(port_of "$peer")
  if alive "$peer" && answers "$peer"; then
    say "$peer: already running (pid $(pid_of "$peer"))"
    return 0
  fi
  if alive "$peer"; then
    fail_peer "$peer" "pid $(pid_of "$peer") is running but does not answer on $HOST:$port; run scripts/peers.sh stop, then start"
    return 0
  fi
  if port_open "$port"; then
    fail_peer "$peer" "$HOST:$port is already taken by another process$(holder_of "$port") (not started by this script; stop it, or move the peer with its PEERS_*_PORT variable)"
    return 0
  fi
  if [ "$peer" = etcd ] && port_open "$ETCD_PEER_PORT"; then
    fail_peer "$peer" "its peer port $HOST:$ETCD_PEER_PORT is already taken$(holder_of "$ETCD_PEER_PORT") (set PEERS_ETCD_PEER_PORT)"
    return 0
  fi
  rm -rf "$dir"
  mkdir -p "$dir/data"
  "launch_$peer" "$dir"
  pid=$(pid_of "$peer")
  local deadline=$((SECONDS + WAIT_SECS))
  until answers "$peer"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      fail_peer "$peer" "exited during startup"
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      fail_peer "$peer" "no answer on $HOST:$port within ${WAIT_SECS}s (pid $pid left running; scripts/peers.sh stop ends it)"
      return 0
    fi
    sleep 0.2
  done
  if ! command -v ss >/dev/null 2>&1; then
    say "$peer: ss is missing, so its listening addresses were not checked (scripts/peers.sh install adds it)"
  else
    while read -r addr; do
      case "$addr" in
        # A JVM shows an IPv4 bind in its IPv6 form.
        "$HOST":* | "[::ffff:$HOST]":*) ;;
        *)
          fail_peer "$peer" "listens on $addr, not only on $HOST; stopped"
          stop_one "$peer" >/dev/null
          return 0
          ;;
      esac
    done < <(listening_of "$pid")
  fi
  say "$peer: started (pid $pid)"
}

cmd_start() {
  FAILED=()
  mkdir -p "$ROOT"
  local peer
  for peer in "${PEERS[@]}"; do start_one "$peer"; done
  cmd_status
  if [ ${#FAILED[@]} -gt 0 ]; then
    die "failed to start: ${FAILED[*]} (the others are running; scripts/peers.sh stop ends them)"
  fi
}

# --- status and stop ---------------------------------------------------------

cmd_status() {
  local peer dir port addrs
  printf '%-10s %-9s %-8s %-38s %s\n' peer state version address folder
  for peer in "${PEERS[@]}"; do
    dir=$(dir_of "$peer")
    port=$(port_of "$peer")
    if alive "$peer" && answers "$peer"; then
      addrs="$HOST:$port"
      [ "$peer" = etcd ] && addrs="$addrs (peer $HOST:$ETCD_PEER_PORT)"
      printf '%-10s %-9s %-8s %-38s %s\n' "$peer" running "$(version_of "$peer")" "$addrs" "$dir"
    elif alive "$peer"; then
      printf '%-10s %-9s %-8s %-38s %s\n' "$peer" "no-answer" - "$HOST:$port" "$dir (log: $dir/log)"
    else
      printf '%-10s %-9s %-8s %-38s %s\n' "$peer" stopped - - -
    fi
  done
  local packages
  packages=$(dpkg-query -W -f='${Package} ${Version}, ' redis-server etcd-server zookeeper 2>/dev/null || true)
  [ -z "$packages" ] || say "debian packages: ${packages%, }"
}

stop_one() {
  local peer=$1 dir pid
  dir=$(dir_of "$peer")
  if alive "$peer"; then
    pid=$(pid_of "$peer")
    kill -TERM "$pid" 2>/dev/null || true
    # A JVM or etcd flushing on TERM takes a moment; a bound, then KILL.
    local waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 100 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      say "$peer: killed (pid $pid did not stop within 10s of TERM)"
    else
      say "$peer: stopped (pid $pid)"
    fi
  else
    say "$peer: not running"
  fi
  rm -rf "$dir"
}

cmd_stop() {
  local peer
  for peer in "${PEERS[@]}"; do stop_one "$peer"; done
  rmdir "$ROOT" 2>/dev/null || true
}

# --- benches ------------------------------------------------------------------

STARTED=()
stop_started() {
  local peer
  for peer in "${STARTED[@]}"; do stop_one "$peer"; done
  rmdir "$ROOT" 2>/dev/null || true
}

# Runs one bench of benches/peers with the peers up: those already running
# are used and left running, the others are started here and stopped at exit.
run_bench() {
  local bench=$1 peer repo
  shift
  command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH; install Rust (https://rustup.rs) first"
  if [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null 2>&1; then
    die "protoc is missing, and the etcd client crate's build needs it; run scripts/peers.sh install first"
  fi
  FAILED=()
  mkdir -p "$ROOT"
  trap stop_started EXIT
  for peer in "${PEERS[@]}"; do
    if alive "$peer" && answers "$peer"; then
      say "$peer: already running (pid $(pid_of "$peer")), left running afterwards"
    else
      start_one "$peer"
      if alive "$peer"; then STARTED+=("$peer"); fi
    fi
  done
  # A peer that failed to start is skipped by the bench, which says so.
  [ ${#FAILED[@]} -eq 0 ] || say "peers.sh: going on without: ${FAILED[*]}"
  repo=$(cd "$(dirname "$0")/.." && pwd)
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target} \
    cargo bench --manifest-path "$repo/benches/peers/Cargo.toml" --bench "$bench" -- "$@"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  bench) shift && run_bench compare "$@" ;;
  smoke) shift && run_bench peers_smoke "$@" ;;
  *) die "usage: scripts/peers.sh install|start|stop|status|bench [ARGS]|smoke [ARGS]" ;;
esac
