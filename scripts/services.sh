#!/usr/bin/env bash
# Starts, stops and reports the real services the tests talk to, on 127.0.0.1 only.
#
#   scripts/services.sh start|stop|restart|status NAME
#
# Idempotent: installs what is missing (apt-get, as root), reuses what already runs.
# Run state lives in .services/NAME (git-ignored). `status` prints running/stopped and exits
# 0 when the service runs, 3 when it does not.
#
# Services:
#   mosquitto   MQTT broker (Debian's mosquitto). Listeners:
#                 127.0.0.1:1883  plain, anonymous
#                 127.0.0.1:8883  TLS + username/password (user `tidewatch`, password
#                                 `tidewatch-test`); the server certificate (127.0.0.1 and
#                                 localhost) is signed by .services/mosquitto/ca.crt
#                 127.0.0.1:8884  TLS + client certificate (client.crt/.key, signed by the
#                                 same CA; its CN is the user name)
#               other-ca.crt is a CA that signed nothing: for "untrusted certificate" tests.
#               Persistence is on (.services/mosquitto/data): a restart keeps persistent
#               sessions and their queued QoS 1/2 messages.
#
#   prometheus  Prometheus (Debian's prometheus) on 127.0.0.1:9090, configured from
#               k8s/monitoring/prometheus.yml with the shipped rules file
#               (k8s/monitoring/prometheus-rules.yml) unchanged; substituted: the scrape
#               target ($TIDEWATCH_SCRAPE_TARGET, default 127.0.0.1:19898, the port the
#               alerting test serves /metrics on), the scrape and evaluation interval
#               ($TIDEWATCH_SCRAPE_INTERVAL, default 1s) and Alertmanager (127.0.0.1:9093).
#   alertmanager  Alertmanager (Debian's prometheus-alertmanager) on 127.0.0.1:9093, clustering
#               off, from k8s/monitoring/alertmanager.yml with only the webhook URL
#               substituted ($TIDEWATCH_ALERT_WEBHOOK_URL, default
#               http://127.0.0.1:19899/alerts, where the alerting test listens).
#
# Later issues add Kafka and Ceph as more `case` arms.
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
name=${2:-}
state=$(pwd)/.services

usage() { echo "usage: $0 start|stop|restart|status NAME" >&2; exit 2; }
[ -n "$action" ] && [ -n "$name" ] || usage

# apt-get install, without letting the packages' own services start (they would take the
# ports and run as system services): a policy-rc.d that forbids starting, removed afterwards.
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "installing $* needs root (apt-get); install them by hand or run as root" >&2
    exit 1
  fi
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created=1
  fi
  local status=0
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null || status=$?
  fi
  [ "$created" -eq 1 ] && rm -f "$policy"
  return "$status"
}

# The pid in a pid file, if that process is alive.
live_pid() {
  local file=$1 pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

# Waits until something accepts connections on 127.0.0.1:PORT (polls, up to SECONDS).
wait_port() {
  local port=$1 seconds=${2:-10} deadline
  deadline=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -le "$deadline" ]; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  return 1
}

# Waits until PID is gone (polls, up to SECONDS).
wait_gone() {
  local pid=$1 seconds=${2:-10} deadline
  deadline=$(( $(date +%s) + seconds ))
  while kill -0 "$pid" 2>/dev/null; do
    [ "$(date +%s)" -le "$deadline" ] || return 1
    sleep 0.05
  done
  return 0
}

# ---------------------------------------------------------------------------------------------
# mosquitto
# ---------------------------------------------------------------------------------------------

MQTT_USER=tidewatch
MQTT_PASSWORD=tidewatch-test

mosquitto_files() {
  local dir=$1
  mkdir -p "$dir/data"
  if [ ! -f "$dir/client.crt" ]; then
    (
      cd "$dir"
      openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
        -subj "/CN=tidewatch test CA" 2>/dev/null
      printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > server.ext
      openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
        -subj "/CN=localhost" 2>/dev/null
      openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.crt -days 3650 -extfile server.ext 2>/dev/null
      printf 'extendedKeyUsage=clientAuth\n' > client.ext
      openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr \
        -subj "/CN=tidewatch-client" 2>/dev/null
      openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out client.crt -days 3650 -extfile client.ext 2>/dev/null
      # A second CA that signed nothing the broker uses: for "untrusted certificate" tests.
      openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.crt \
        -days 3650 -subj "/CN=some other CA" 2>/dev/null
      rm -f server.csr client.csr
    )
  fi
  rm -f "$dir/passwd"
  mosquitto_passwd -b -c "$dir/passwd" "$MQTT_USER" "$MQTT_PASSWORD" >/dev/null 2>&1
  cat > "$dir/mosquitto.conf" <<CONF
# Generated by scripts/services.sh: loopback only.
per_listener_settings true
pid_file $dir/mosquitto.pid
persistence true
persistence_location $dir/data/
autosave_interval 1
log_dest file $dir/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
# At-least-once consumers withhold acks until their data is processed: let many messages be
# in flight, and queue (never drop) what a slow or absent persistent session has not taken.
max_inflight_messages 1000
max_queued_messages 0
max_queued_bytes 0
persistent_client_expiration 2d

listener 1883 127.0.0.1
allow_anonymous true

listener 8883 127.0.0.1
allow_anonymous false
password_file $dir/passwd
cafile $dir/ca.crt
certfile $dir/server.crt
keyfile $dir/server.key
require_certificate false

listener 8884 127.0.0.1
allow_anonymous false
cafile $dir/ca.crt
certfile $dir/server.crt
keyfile $dir/server.key
require_certificate true
use_identity_as_username true
CONF
  # mosquitto started as root drops to user `mosquitto` before reading these.
  chmod 755 "$dir" "$dir/data"
  chmod 644 "$dir"/*.crt "$dir"/*.key "$dir/passwd" "$dir/mosquitto.conf"
  if [ "$(id -u)" -eq 0 ] && id mosquitto >/dev/null 2>&1; then
    chown -R mosquitto "$dir/data"
    touch "$dir/mosquitto.log"
    chown mosquitto "$dir/mosquitto.log" "$dir"
    # A checkout under a folder the mosquitto user cannot enter (e.g. /root): keep root.
    if ! runuser -u mosquitto -- test -r "$dir/mosquitto.conf" 2>/dev/null; then
      printf '\n# The mosquitto user cannot reach this folder: stay root.\nuser root\n' \
        >> "$dir/mosquitto.conf"
    fi
  fi
}

mosquitto_start() {
  local dir=$state/mosquitto pid
  if pid=$(live_pid "$dir/mosquitto.pid"); then
    if wait_port 1883 5 && wait_port 8883 5 && wait_port 8884 5; then
      echo "mosquitto already running (pid $pid)"
      return 0
    fi
  fi
  if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_passwd >/dev/null 2>&1 \
     || ! command -v mosquitto_sub >/dev/null 2>&1; then
    echo "installing mosquitto (apt-get)"
    apt_install mosquitto mosquitto-clients
  fi
  local binary
  binary=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  mosquitto_files "$dir"
  rm -f "$dir/mosquitto.pid"
  "$binary" -c "$dir/mosquitto.conf" -d
  if ! wait_port 1883 10 || ! wait_port 8883 10 || ! wait_port 8884 10; then
    echo "mosquitto did not start; its log:" >&2
    tail -n 30 "$dir/mosquitto.log" >&2 || true
    exit 1
  fi
  # The pid file is written once it has bound its ports.
  local deadline=$(( $(date +%s) + 5 ))
  until pid=$(live_pid "$dir/mosquitto.pid"); do
    [ "$(date +%s)" -le "$deadline" ] || { echo "mosquitto wrote no pid file" >&2; exit 1; }
    sleep 0.05
  done
  echo "mosquitto running (pid $pid): mqtt://127.0.0.1:1883, mqtts://127.0.0.1:8883 (user $MQTT_USER), mqtts://127.0.0.1:8884 (client certificate)"
}

mosquitto_stop() {
  local dir=$state/mosquitto pid
  if pid=$(live_pid "$dir/mosquitto.pid"); then
    kill "$pid"
    if ! wait_gone "$pid" 10; then
      kill -9 "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || true
    fi
    echo "mosquitto stopped"
  else
    echo "mosquitto not running"
  fi
  rm -f "$dir/mosquitto.pid"
}

mosquitto_status() {
  local pid
  if pid=$(live_pid "$state/mosquitto/mosquitto.pid"); then
    echo "mosquitto running (pid $pid)"
    return 0
  fi
  echo "mosquitto stopped"
  return 3
}

# ---------------------------------------------------------------------------------------------
# prometheus and alertmanager
# ---------------------------------------------------------------------------------------------

PROMETHEUS_PORT=9090
ALERTMANAGER_PORT=9093

# Waits until http://127.0.0.1:PORT/-/ready answers 200 (polls, up to SECONDS).
wait_ready() {
  local port=$1 seconds=${2:-30} deadline
  deadline=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -le "$deadline" ]; do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/-/ready" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

prometheus_files() {
  local dir=$1 target=${TIDEWATCH_SCRAPE_TARGET:-127.0.0.1:19898}
  local interval=${TIDEWATCH_SCRAPE_INTERVAL:-1s} shipped=$(pwd)/k8s/monitoring
  mkdir -p "$dir/data"
  # The shipped example with the target, intervals, Alertmanager and the rules file's
  # absolute path substituted; the rules file itself is used as shipped.
  sed -e "s#tidewatch\.tidewatch\.svc:9898#$target#" \
      -e "s#alertmanager\.monitoring\.svc:9093#127.0.0.1:$ALERTMANAGER_PORT#" \
      -e "s#^\(  *scrape_interval:\).*#\1 $interval#" \
      -e "s#^\(  *evaluation_interval:\).*#\1 $interval#" \
      -e "s#^  - prometheus-rules\.yml#  - $shipped/prometheus-rules.yml#" \
      "$shipped/prometheus.yml" > "$dir/prometheus.yml"
  promtool check config "$dir/prometheus.yml" >/dev/null
}

alertmanager_files() {
  local dir=$1 url=${TIDEWATCH_ALERT_WEBHOOK_URL:-http://127.0.0.1:19899/alerts}
  mkdir -p "$dir/data"
  sed -e "s#http://tidewatch-alert-receiver\.monitoring\.svc:8080/alerts#$url#" \
      k8s/monitoring/alertmanager.yml > "$dir/alertmanager.yml"
  amtool check-config "$dir/alertmanager.yml" >/dev/null
}

# prom_start NAME BINARY PACKAGE PORT ARGS...: starts BINARY in the background with ARGS,
# its pid in .services/NAME/NAME.pid and its log in .services/NAME/NAME.log.
prom_start() {
  local name=$1 binary=$2 package=$3 port=$4 dir=$state/$1 pid
  shift 4
  if pid=$(live_pid "$dir/$name.pid") && wait_ready "$port" 5; then
    echo "$name already running (pid $pid)"
    return 0
  fi
  if ! command -v "$binary" >/dev/null 2>&1; then
    echo "installing $package (apt-get)"
    apt_install "$package"
  fi
  "${name}_files" "$dir"
  rm -f "$dir/$name.pid"
  nohup "$binary" "$@" > "$dir/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
  if ! wait_ready "$port" 60; then
    echo "$name did not become ready; its log:" >&2
    tail -n 30 "$dir/$name.log" >&2 || true
    exit 1
  fi
  echo "$name running (pid $(cat "$dir/$name.pid")): http://127.0.0.1:$port"
}

prometheus_start() {
  local dir=$state/prometheus
  prom_start prometheus prometheus prometheus "$PROMETHEUS_PORT" \
    --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --storage.tsdb.retention.time=1d --web.listen-address=127.0.0.1:$PROMETHEUS_PORT
}

alertmanager_start() {
  local dir=$state/alertmanager
  # An empty --cluster.listen-address turns clustering off (else it binds 0.0.0.0:9094).
  prom_start alertmanager prometheus-alertmanager prometheus-alertmanager "$ALERTMANAGER_PORT" \
    --config.file="$dir/alertmanager.yml" --storage.path="$dir/data" \
    --web.listen-address=127.0.0.1:$ALERTMANAGER_PORT --cluster.listen-address=
}

# prom_stop NAME
prom_stop() {
  local name=$1 dir=$state/$1 pid
  if pid=$(live_pid "$dir/$name.pid"); then
    kill "$pid"
    if ! wait_gone "$pid" 15; then
      kill -9 "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || true
    fi
    echo "$name stopped"
  else
    echo "$name not running"
  fi
  rm -f "$dir/$name.pid"
}

# prom_status NAME
prom_status() {
  local name=$1 pid
  if pid=$(live_pid "$state/$name/$name.pid"); then
    echo "$name running (pid $pid)"
    return 0
  fi
  echo "$name stopped"
  return 3
}

# ---------------------------------------------------------------------------------------------

case "$name" in
  mosquitto)
    case "$action" in
      start) mosquitto_start ;;
      stop) mosquitto_stop ;;
      restart) mosquitto_stop; mosquitto_start ;;
      status) mosquitto_status ;;
      *) usage ;;
    esac
    ;;
  prometheus|alertmanager)
    case "$action" in
      start) "${name}_start" ;;
      stop) prom_stop "$name" ;;
      restart) prom_stop "$name"; "${name}_start" ;;
      status) prom_status "$name" ;;
      *) usage ;;
    esac
    ;;
  *)
    echo "unknown service: $name (known: mosquitto, prometheus, alertmanager)" >&2
    exit 2
    ;;
esac
