#!/usr/bin/env bash
# A local single-node Ray cluster for development, bound to 127.0.0.1, with token auth.
#
#   ops/cluster.sh start     # ray start --head on 127.0.0.1; dashboard on http://127.0.0.1:8265
#   eval "$(ops/cluster.sh env)"
#   ray job submit --working-dir . -- raytrain train --config jobs/tiny/shapes.yaml
#   ops/cluster.sh status
#   ops/cluster.sh stop      # stops THIS cluster only (never `ray stop`, which kills every Ray)
#   ops/cluster.sh token     # prints the token (paste it into the dashboard's login prompt)
#
# Settings (environment variables; the defaults suit a 2-core, few-GiB box):
#   RAYTRAIN_CLUSTER_DIR      state: pid, log, auth token, Ray's temp dir   [/tmp/raytrain-cluster]
#   RAYTRAIN_RAY_PORT         GCS port                                      [6379]
#   RAYTRAIN_DASHBOARD_PORT   dashboard / Jobs API port                     [8265]
#   RAYTRAIN_CLIENT_PORT      Ray Client server port, outside 10002-19999   [10001]
#                             (Ray's default worker port range)
#   RAYTRAIN_NUM_CPUS         logical CPUs advertised                       [nproc]
#   RAYTRAIN_NUM_GPUS         GPUs advertised                               [auto-detected]
#   RAYTRAIN_OBJECT_STORE_MB  object store (shared memory) cap, MiB         [1024]
#
# Token auth: the cluster gets its own random token in $RAYTRAIN_CLUSTER_DIR/auth_token (mode
# 600), passed to Ray through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH. The script never
# writes ~/.ray/auth_token, which ray.init() and other clusters on this machine may use.
# Clients (`ray job submit`, `ray status`, a driver that joins with ray.init) need the same two
# variables; `env` prints them together with the addresses.
#
# Ray's temp dir is private to this cluster ($RAYTRAIN_CLUSTER_DIR/ray), so a bare ray.init()
# elsewhere on the machine does not attach to this cluster by accident (e.g. other people's
# tests). A driver that should join it sets RAY_ADDRESS, which `env` also prints.
set -euo pipefail

DIR="${RAYTRAIN_CLUSTER_DIR:-/tmp/raytrain-cluster}"
PORT="${RAYTRAIN_RAY_PORT:-6379}"
DASH_PORT="${RAYTRAIN_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAYTRAIN_CLIENT_PORT:-10001}"
NUM_CPUS="${RAYTRAIN_NUM_CPUS:-$(nproc)}"
NUM_GPUS="${RAYTRAIN_NUM_GPUS:-}"
OBJECT_STORE_MB="${RAYTRAIN_OBJECT_STORE_MB:-1024}"

HOST=127.0.0.1
PID_FILE="$DIR/ray.pid"
LOG_FILE="$DIR/ray.log"
TOKEN_FILE="$DIR/auth_token"
TEMP_DIR="$DIR/ray"  # Ray's sockets live under it; unix socket paths must stay under 107 bytes

die() { echo "cluster.sh: $*" >&2; exit 1; }

running_pid() {
  # The pid of our `ray start --block`, if it is still running; nothing otherwise.
  [[ -f "$PID_FILE" ]] || return 0
  local pid
  pid="$(cat "$PID_FILE")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && grep -q "ray" "/proc/$pid/cmdline" 2>/dev/null; then
    echo "$pid"
  fi
}

client_env() {
  # What a client on this machine needs to talk to this cluster.
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
  # Without it, Ray's CLI rewrites 127.0.0.1 to this machine's outward address and misses the GCS.
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
  echo "export RAY_API_SERVER_ADDRESS=http://$HOST:$DASH_PORT  # ray job submit/logs/status/stop"
  echo "export RAY_ADDRESS=$HOST:$PORT  # ray status; a driver that joins with ray.init()"
}

port_free() {
  python - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

dashboard_ok() {
  # 200 from an authenticated endpoint: the dashboard is up AND accepts our token.
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --noproxy '*' -m 5 \
    -H "Authorization: Bearer $(cat "$TOKEN_FILE")" "http://$HOST:$DASH_PORT/api/jobs/" || true)"
  [[ "$code" == "200" ]]
}

our_pids() {
  # Every process started for this cluster: the command lines name our temp dir.
  local pid
  for pid in $(pgrep -f -- "$TEMP_DIR" || true); do
    [[ "$pid" == "$$" ]] || echo "$pid"
  done
}

cmd_start() {
  [[ -z "$(running_pid)" ]] || die "already running (pid $(running_pid)); see: $0 status"
  [[ ${#TEMP_DIR} -le 40 ]] || die "RAYTRAIN_CLUSTER_DIR is too long for Ray's unix sockets; use a short path such as /tmp/rtc"
  local p
  for p in "$PORT" "$DASH_PORT" "$CLIENT_PORT"; do
    # Checked here because Ray would quietly move the dashboard to another free port.
    port_free "$p" || die "port $p on $HOST is in use (another Ray?). Pick others with RAYTRAIN_RAY_PORT / RAYTRAIN_DASHBOARD_PORT / RAYTRAIN_CLIENT_PORT"
  done

  mkdir -p "$DIR"
  chmod 700 "$DIR"
  if [[ ! -s "$TOKEN_FILE" ]]; then
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN_FILE")
  fi

  local args=(
    --head --block
    --node-ip-address="$HOST" --port="$PORT"
    --dashboard-host="$HOST" --dashboard-port="$DASH_PORT" --include-dashboard=true
    --ray-client-server-port="$CLIENT_PORT"
    # 0 = any free port. The default (52365) clashes with any other Ray on this machine.
    --dashboard-agent-listen-port=0
    --num-cpus="$NUM_CPUS"
    --object-store-memory="$((OBJECT_STORE_MB * 1024 * 1024))"
    --temp-dir="$TEMP_DIR"
    --disable-usage-stats
  )
  [[ -z "$NUM_GPUS" ]] || args+=(--num-gpus="$NUM_GPUS")

  # --block keeps `ray start` in the foreground as the parent of this node's processes. On
  # SIGTERM it shuts down exactly those, which is how `stop` leaves every other Ray alone.
  # setsid: the cluster outlives the shell that started it.
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
    setsid ray start "${args[@]}" >"$LOG_FILE" 2>&1 </dev/null &
  echo $! >"$PID_FILE"

  local i
  for i in $(seq 1 120); do
    if dashboard_ok; then
      echo "Ray is up on $HOST:$PORT (pid $(cat "$PID_FILE")); dashboard http://$HOST:$DASH_PORT"
      echo "Resources: CPU=$NUM_CPUS, object store ${OBJECT_STORE_MB} MiB. Log: $LOG_FILE"
      echo "For clients on this machine:  eval \"\$($0 env)\""
      return 0
    fi
    [[ -n "$(running_pid)" ]] || { tail -n 30 "$LOG_FILE" >&2; die "ray start exited; log: $LOG_FILE"; }
    sleep 1
  done
  tail -n 30 "$LOG_FILE" >&2
  die "the dashboard did not answer on $HOST:$DASH_PORT within 120 s; '$0 stop' cleans up"
}

cmd_stop() {
  local pid i
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    kill -TERM "$pid"
    for i in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # Leftovers of THIS cluster only (matched on its temp dir), e.g. after a kill -9 of the parent.
  for i in $(seq 1 10); do
    [[ -n "$(our_pids)" ]] || break
    sleep 1
  done
  for pid in $(our_pids); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$PID_FILE"
  echo "stopped"
}

cmd_status() {
  local pid
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    echo "not running (state dir $DIR)"
    return 3
  fi
  echo "running: pid $pid, GCS $HOST:$PORT, dashboard http://$HOST:$DASH_PORT, log $LOG_FILE"
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
    ray status --address "$HOST:$PORT"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) [[ -s "$TOKEN_FILE" ]] || die "no token yet: run '$0 start' first"; client_env ;;
  token) [[ -s "$TOKEN_FILE" ]] || die "no token yet: run '$0 start' first"; cat "$TOKEN_FILE" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
