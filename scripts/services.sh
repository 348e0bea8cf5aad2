#!/usr/bin/env bash
# Starts, stops and reports the real services the tests talk to, on 127.0.0.1 only.
#
#   scripts/services.sh start|stop|restart|status|env NAME
#
# Idempotent: installs what is missing (apt-get, as root), reuses what already runs.
# Run state lives in .services/NAME (git-ignored). `status` prints running/stopped and exits
# 0 when the service runs, 3 when it does not. `env` prints the shell `export` lines a client
# needs (`eval "$(scripts/services.sh env ceph)"`); nothing for services without any.
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
#   kafka       Apache Kafka 4.1.1, one KRaft node (broker and controller in one JVM):
#                 127.0.0.1:9092   clients (PLAINTEXT); `env` prints
#                                  TIDEWATCH_KAFKA_BROKERS=127.0.0.1:9092
#                 127.0.0.1:19093  the controller (9093 is Alertmanager's)
#               Topics are auto-created with 4 partitions; replication factor 1 everywhere
#               (offsets and transaction state topics too); group.initial.rebalance.delay.ms=0.
#               The jars come from Maven Central (scripts/kafka/pom.xml, needs Java 17 and
#               Maven) into ${TIDEWATCH_CACHE:-~/.cache/tidewatch}/kafka-4.1.1/libs, once.
#               Data in .services/kafka/data survives a restart; log in .services/kafka/kafka.log.
#               Heap: 512 MB at most.
#
#   ceph        Single-node Ceph 16 (Debian's ceph-mon, ceph-osd, radosgw): one monitor
#               (127.0.0.1:3300), one OSD on memstore (127.0.0.1:6800-6807; objects in memory:
#               stopping it loses all data), no manager, cephx keyrings, RGW pools created
#               up front, and radosgw with its S3 API on
#                 http://127.0.0.1:7480   path-style; user `tidewatch`, access key
#                                         TIDEWATCHTESTKEY, secret tidewatch-test-secret,
#                                         region us-east-1 (radosgw takes any region name in
#                                         signatures); bucket `tidewatch`
#               `start` always makes sure the user and the bucket exist; `env` prints
#               AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION.
#               By hand: curl --aws-sigv4 aws:amz:us-east-1:s3 --user KEY:SECRET
#               -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' (Debian's curl 7.88 does not send
#               that header itself, and radosgw rejects the signature without it).
#               Config, keyrings and logs in .services/ceph.
#   ceph-rgw    Only the radosgw of a running `ceph` (monitor and OSD keep running, objects
#               are kept): `stop ceph-rgw`, then `start ceph-rgw`, simulates an object-store
#               outage.
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
name=${2:-}
state=$(pwd)/.services
services="mosquitto prometheus alertmanager kafka ceph ceph-rgw"

usage() { echo "usage: $0 start|stop|restart|status|env NAME" >&2; exit 2; }
if [ -z "$action" ] || [ -z "$name" ]; then usage; fi

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

# need LABEL PACKAGES COMMAND...: installs PACKAGES (a space-separated list) unless every
# COMMAND is on PATH.
need() {
  local label=$1 packages=$2 command
  shift 2
  for command in "$@"; do
    command -v "$command" >/dev/null 2>&1 && continue
    echo "installing $label (apt-get)"
    # shellcheck disable=SC2086 # a list of package names
    apt_install $packages
    return
  done
}

# ---------------------------------------------------------------------------------------------
# Daemons with a pid file: one set of functions for every service
# ---------------------------------------------------------------------------------------------

# The pid in a pid file, if that process is alive.
live_pid() {
  local file=$1 pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

# poll SECONDS COMMAND...: runs COMMAND until it succeeds (returns 0) or SECONDS have passed
# (returns 1).
poll() {
  local seconds=$1 deadline
  shift
  deadline=$(( $(date +%s) + seconds ))
  until "$@"; do
    [ "$(date +%s)" -le "$deadline" ] || return 1
    sleep 0.05
  done
}

# Probes for poll.
ports_open() {  # PORT...: something accepts connections on each 127.0.0.1:PORT
  local port
  for port in "$@"; do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || return 1
  done
}
http_ok() { curl -fsS --max-time 5 -o /dev/null "$1" 2>/dev/null; }  # URL answers 2xx
pid_gone() { ! kill -0 "$1" 2>/dev/null; }
# PIDFILE COMMAND...: COMMAND succeeds, or PIDFILE's process has died (no use waiting).
probe_or_dead() {
  local pidfile=$1
  shift
  ! live_pid "$pidfile" >/dev/null || "$@" >/dev/null 2>&1
}

# already_running NAME PIDFILE PROBE...: true, and says so, when PIDFILE names a live process
# and PROBE succeeds. A live process that fails PROBE is stopped (so that a new one does not
# run beside it, left without a pid file).
already_running() {
  local name=$1 pidfile=$2 pid
  pid=$(live_pid "$pidfile") || return 1
  shift 2
  if "$@"; then
    echo "$name already running (pid $pid)"
    return 0
  fi
  echo "$name (pid $pid) does not answer: restarting it"
  daemon_stop "$name" "$pidfile" >/dev/null
  return 1
}

# daemon_spawn PIDFILE LOG COMMAND...: runs COMMAND in the background (it must stay in the
# foreground itself), its output in LOG and its pid in PIDFILE.
daemon_spawn() {
  local pidfile=$1 log=$2
  shift 2
  rm -f "$pidfile"
  nohup "$@" > "$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
}

# fail NAME LOG [WHAT]: says NAME did not become ready (or WHAT), prints LOG's first errors
# (a failing daemon's last lines tend to be its shutdown) and its tail, and exits 1.
fail() {
  echo "$1 ${3:-did not become ready}; its log ($2):" >&2
  if grep -qiE 'error|fatal' "$2" 2>/dev/null; then
    echo "--- first errors:" >&2
    grep -iE -A2 'error|fatal' "$2" | head -n 15 >&2
    echo "--- last lines:" >&2
  fi
  tail -n 30 "$2" >&2 || true
  exit 1
}

# await NAME PIDFILE LOG SECONDS PROBE...: polls PROBE until it succeeds; when SECONDS pass
# first or PIDFILE's process dies, fails with LOG's tail.
await() {
  local name=$1 pidfile=$2 log=$3 seconds=$4
  shift 4
  if ! poll "$seconds" probe_or_dead "$pidfile" "$@" || ! live_pid "$pidfile" >/dev/null; then
    fail "$name" "$log"
  fi
}

# daemon_stop NAME PIDFILE [SECONDS]: SIGTERM, up to SECONDS (15) to exit, then SIGKILL.
daemon_stop() {
  local name=$1 pidfile=$2 seconds=${3:-15} pid
  if pid=$(live_pid "$pidfile"); then
    kill "$pid"
    if ! poll "$seconds" pid_gone "$pid"; then
      kill -9 "$pid" 2>/dev/null || true
      poll 5 pid_gone "$pid" || true
    fi
    echo "$name stopped"
  else
    echo "$name not running"
  fi
  rm -f "$pidfile"
}

# daemon_status NAME PIDFILE: running (0) or stopped (3).
daemon_status() {
  local name=$1 pid
  if pid=$(live_pid "$2"); then
    echo "$name running (pid $pid)"
    return 0
  fi
  echo "$name stopped"
  return 3
}

# ---------------------------------------------------------------------------------------------
# mosquitto
# ---------------------------------------------------------------------------------------------

MQTT_USER=tidewatch
MQTT_PASSWORD=tidewatch-test

# issue_cert NAME CN EXTENSION: NAME.key and NAME.crt (CN, EXTENSION) signed by ca.crt, in the
# current folder.
issue_cert() {
  printf '%s\n' "$3" > "$1.ext"
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out "$1.crt" -days 3650 -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr"
}

mosquitto_files() {
  local dir=$1
  mkdir -p "$dir/data"
  if [ ! -f "$dir/client.crt" ]; then
    (
      cd "$dir"
      openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
        -subj "/CN=tidewatch test CA" 2>/dev/null
      issue_cert server localhost 'subjectAltName=DNS:localhost,IP:127.0.0.1'
      issue_cert client tidewatch-client 'extendedKeyUsage=clientAuth'
      # A second CA that signed nothing the broker uses: for "untrusted certificate" tests.
      openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.crt \
        -days 3650 -subj "/CN=some other CA" 2>/dev/null
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
# Saved on a clean stop, and every 60 s: saving blocks the broker (tens of ms for a few MB of
# queued session state), which every message in flight then waits out (benches/latency.sh).
autosave_interval 60
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
# Send each packet at once (no Nagle delay): a lone command or reading would otherwise wait
# for the peer's delayed ACK (benches/latency.sh measures it).
set_tcp_nodelay true

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
  already_running mosquitto "$dir/mosquitto.pid" poll 5 ports_open 1883 8883 8884 && return 0
  need mosquitto "mosquitto mosquitto-clients" mosquitto mosquitto_passwd mosquitto_sub
  local binary
  binary=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  mosquitto_files "$dir"
  rm -f "$dir/mosquitto.pid"
  # It daemonizes itself (-d) and writes its pid file once it has bound its ports.
  "$binary" -c "$dir/mosquitto.conf" -d
  poll 10 ports_open 1883 8883 8884 || fail mosquitto "$dir/mosquitto.log"
  poll 5 live_pid "$dir/mosquitto.pid" >/dev/null || { echo "mosquitto wrote no pid file" >&2; exit 1; }
  pid=$(live_pid "$dir/mosquitto.pid")
  echo "mosquitto running (pid $pid): mqtt://127.0.0.1:1883, mqtts://127.0.0.1:8883 (user $MQTT_USER), mqtts://127.0.0.1:8884 (client certificate)"
}

# ---------------------------------------------------------------------------------------------
# prometheus and alertmanager
# ---------------------------------------------------------------------------------------------

PROMETHEUS_PORT=9090
ALERTMANAGER_PORT=9093

prometheus_files() {
  local dir=$1 target=${TIDEWATCH_SCRAPE_TARGET:-127.0.0.1:19898}
  local interval=${TIDEWATCH_SCRAPE_INTERVAL:-1s} shipped
  shipped=$(pwd)/k8s/monitoring
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
# its pid in .services/NAME/NAME.pid and its log in .services/NAME/NAME.log; ready when
# http://127.0.0.1:PORT/-/ready answers.
prom_start() {
  local name=$1 binary=$2 package=$3 port=$4 dir=$state/$1
  local ready=http://127.0.0.1:$4/-/ready
  shift 4
  already_running "$name" "$dir/$name.pid" poll 5 http_ok "$ready" && return 0
  need "$package" "$package" "$binary"
  "${name}_files" "$dir"
  daemon_spawn "$dir/$name.pid" "$dir/$name.log" "$binary" "$@"
  await "$name" "$dir/$name.pid" "$dir/$name.log" 60 http_ok "$ready"
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

# ---------------------------------------------------------------------------------------------
# kafka
# ---------------------------------------------------------------------------------------------

# The version is also in scripts/kafka/pom.xml: change both together.
KAFKA_VERSION=4.1.1
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=19093
KAFKA_LIBS=${TIDEWATCH_CACHE:-$HOME/.cache/tidewatch}/kafka-$KAFKA_VERSION/libs

# The broker's jars, from Maven Central, once (a finished download is marked .complete).
kafka_fetch() {
  [ -f "$KAFKA_LIBS/.complete" ] && return 0
  need java openjdk-17-jre-headless java
  need maven maven mvn
  echo "downloading the Kafka $KAFKA_VERSION jars (Maven Central) into $KAFKA_LIBS"
  rm -rf "$KAFKA_LIBS.part"
  mkdir -p "$KAFKA_LIBS.part"
  mvn -q -B -f scripts/kafka/pom.xml dependency:copy-dependencies \
    -DoutputDirectory="$KAFKA_LIBS.part" > "$KAFKA_LIBS.part/mvn.log" 2>&1 \
    || fail "the Kafka download (mvn)" "$KAFKA_LIBS.part/mvn.log" "did not succeed"
  touch "$KAFKA_LIBS.part/.complete"
  rm -rf "$KAFKA_LIBS"
  mv "$KAFKA_LIBS.part" "$KAFKA_LIBS"
}

# kafka_tool CLASS ARGS...: runs one of Kafka's command-line classes (small, quick JVM).
kafka_tool() {
  local class=$1
  shift
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$state/kafka/tools-log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$class" "$@"
}

# The broker answers an admin request (listing topics).
kafka_ready() {
  ports_open "$KAFKA_PORT" && kafka_tool org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "127.0.0.1:$KAFKA_PORT" --command-config "$state/kafka/client.properties" \
    --list >/dev/null 2>&1
}

kafka_files() {
  local dir=$1
  mkdir -p "$dir/data"
  cat > "$dir/server.properties" <<CONF
# Generated by scripts/services.sh: one KRaft node, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=4
auto.create.topics.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
# One partition for the group coordinator's topic (50 by default): a fresh broker creates
# it at the first consumer group, and fewer partitions make that first group quick on a
# slow disk (the first cluster test of a CI run once waited over a minute to read).
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
CONF
  # Admin requests of the readiness probe: give up quickly, the probe is retried.
  printf 'request.timeout.ms=3000\ndefault.api.timeout.ms=5000\n' > "$dir/client.properties"
  cat > "$dir/log4j2.properties" <<CONF
# The broker logs to stdout, which scripts/services.sh writes to kafka.log.
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
CONF
  sed -e 's/^rootLogger.level = INFO/rootLogger.level = WARN/' \
      -e 's/^appender.out.type = Console/&\nappender.out.target = SYSTEM_ERR/' \
      -e 's/^# The broker .*/# Kafka'"'"'s command-line tools: warnings and errors only, on stderr./' \
      "$dir/log4j2.properties" > "$dir/tools-log4j2.properties"
}

kafka_start() {
  local dir=$state/kafka
  if already_running kafka "$dir/kafka.pid" poll 180 kafka_ready; then
    echo "kafka bootstrap servers: 127.0.0.1:$KAFKA_PORT"
    return 0
  fi
  kafka_fetch
  kafka_files "$dir"
  if [ ! -f "$dir/data/meta.properties" ]; then
    [ -s "$dir/cluster-id" ] || kafka_tool kafka.tools.StorageTool random-uuid > "$dir/cluster-id"
    kafka_tool kafka.tools.StorageTool format -t "$(cat "$dir/cluster-id")" \
      -c "$dir/server.properties" >/dev/null
  fi
  daemon_spawn "$dir/kafka.pid" "$dir/kafka.log" java -Xms128m -Xmx512m -XX:+UseG1GC \
    -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties"
  await kafka "$dir/kafka.pid" "$dir/kafka.log" 180 kafka_ready
  echo "kafka running (pid $(cat "$dir/kafka.pid")): bootstrap servers 127.0.0.1:$KAFKA_PORT"
}

# A controlled shutdown of a single node takes a few seconds.
kafka_stop() { daemon_stop kafka "$state/kafka/kafka.pid" 30; }

kafka_env() { echo "export TIDEWATCH_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT"; }

# ---------------------------------------------------------------------------------------------
# ceph
# ---------------------------------------------------------------------------------------------

CEPH_RGW_PORT=7480
S3_USER=tidewatch
S3_ACCESS_KEY=TIDEWATCHTESTKEY
S3_SECRET_KEY=tidewatch-test-secret
S3_REGION=us-east-1
S3_BUCKET=tidewatch
S3_URL=http://127.0.0.1:$CEPH_RGW_PORT
# The daemons, in start order: NAME:PIDFILE-STEM.
CEPH_DAEMONS=(ceph-mon:mon ceph-osd:osd ceph-rgw:rgw)

ceph_cli() { ceph -c "$state/ceph/ceph.conf" --connect-timeout 5 "$@"; }
ceph_osd_up() { ceph_cli osd dump 2>/dev/null | grep -q '^osd\.0 up'; }
# A signed S3 request (SigV4) with the test user's keys. curl 7.88 sends no
# x-amz-content-sha256, without which radosgw rejects the signature: declare the payload
# unsigned.
s3() {
  curl -sS --max-time 30 --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
    -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"
}

ceph_files() {
  local dir=$1 fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mkdir -p "$dir"/{mon/ceph-a,osd/ceph-0,run,log}
  cat > "$dir/ceph.conf" <<CONF
# Generated by scripts/services.sh: a throwaway single-node cluster on loopback.
[global]
fsid = $fsid
mon host = v2:127.0.0.1:3300
mon initial members = a
public addr = 127.0.0.1
public network = 127.0.0.1/32
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $dir/run
admin socket = $dir/run/\$cluster-\$name.asok
pid file = $dir/run/\$cluster-\$name.pid
crash dir = $dir/crash
log file = $dir/log/\$cluster-\$name.log
mon data = $dir/mon/\$cluster-\$id
osd data = $dir/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = 1073741824
osd memory target = 268435456
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 1
osd pool default pgp num = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 1
# Quick map updates for a test cluster.
paxos propose interval = 0.05
paxos min wait = 0.01
[client]
keyring = $dir/keyring
[mon]
keyring = $dir/mon/\$cluster-\$id/keyring
[osd]
keyring = $dir/osd/\$cluster-\$id/keyring
[client.rgw.a]
keyring = $dir/rgw.keyring
rgw frontends = beast endpoint=127.0.0.1:$CEPH_RGW_PORT
rgw dns name = localhost
rgw enable usage log = false
CONF
}

# A new cluster: monitor, memstore OSD, the RGW pools and radosgw's key.
ceph_bootstrap() {
  local dir=$1 conf=$1/ceph.conf osd_uuid osd_secret osd_id
  rm -rf "$dir"
  ceph_files "$dir"
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' \
    --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/keyring" >/dev/null
  monmaptool --create --fsid "$(sed -n 's/^fsid = //p' "$conf")" --addv a '[v2:127.0.0.1:3300]' \
    "$dir/monmap" >/dev/null
  ceph-mon --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" -c "$conf"
  daemon_spawn "$dir/mon.pid" "$dir/log/mon.out" ceph-mon -f -i a -c "$conf"
  await ceph-mon "$dir/mon.pid" "$dir/log/ceph-mon.a.log" 30 ceph_cli mon stat
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  osd_secret=$(ceph-authtool --gen-print-key)
  osd_id=$(echo "{\"cephx_secret\": \"$osd_secret\"}" | ceph_cli osd new "$osd_uuid" -i -)
  [ "$osd_id" = 0 ] || { echo "ceph: unexpected OSD id $osd_id" >&2; exit 1; }
  ceph-authtool --create-keyring "$dir/osd/ceph-0/keyring" --name osd.0 --add-key "$osd_secret" \
    >/dev/null
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" > "$dir/log/osd-mkfs.out" 2>&1 \
    || fail ceph-osd "$dir/log/osd-mkfs.out" "could not format its store"
  daemon_spawn "$dir/osd.pid" "$dir/log/osd.out" ceph-osd -f -c "$conf" -i 0
  await ceph-osd "$dir/osd.pid" "$dir/log/ceph-osd.0.log" 60 ceph_osd_up
  # The RGW pools, in one python-rados process: radosgw would otherwise spend seconds
  # creating them at start-up (and each `ceph` command costs about a second).
  # Debian's python3-rados is for Debian's python3, whatever python3 comes first on PATH.
  /usr/bin/python3 - "$conf" <<'PY'
import json, sys, rados
r = rados.Rados(conffile=sys.argv[1], name="client.admin")
r.connect(timeout=30)
for pool in [".rgw.root", "default.rgw.log", "default.rgw.control", "default.rgw.meta",
             "default.rgw.buckets.index", "default.rgw.buckets.data", "default.rgw.buckets.non-ec"]:
    for cmd in ({"prefix": "osd pool create", "pool": pool},
                {"prefix": "osd pool application enable", "pool": pool, "app": "rgw"}):
        ret, out, err = r.mon_command(json.dumps(cmd), b"")
        if ret != 0:
            sys.exit(f"{cmd}: {ret} {err}")
r.shutdown()
PY
  ceph_cli auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' \
    -o "$dir/rgw.keyring"
  touch "$dir/bootstrapped"
}

# The S3 user and the bucket, unless a signed HEAD of the bucket already succeeds.
ceph_s3_setup() {
  local dir=$state/ceph code
  code=$(s3 -o /dev/null -w '%{http_code}' -I "$S3_URL/$S3_BUCKET" 2>/dev/null || true)
  [ "$code" = 200 ] && return 0
  if ! radosgw-admin -c "$dir/ceph.conf" -n client.admin user info --uid="$S3_USER" \
       >/dev/null 2>&1; then
    radosgw-admin -c "$dir/ceph.conf" -n client.admin user create --uid="$S3_USER" \
      --display-name="tidewatch tests" --access-key="$S3_ACCESS_KEY" \
      --secret-key="$S3_SECRET_KEY" >/dev/null
  fi
  code=$(s3 -o "$dir/bucket.out" -w '%{http_code}' -X PUT "$S3_URL/$S3_BUCKET")
  if [ "$code" != 200 ]; then
    echo "ceph: creating bucket $S3_BUCKET failed (HTTP $code):" >&2
    cat "$dir/bucket.out" >&2
    exit 1
  fi
}

ceph_rgw_start() {
  local dir=$state/ceph
  already_running ceph-rgw "$dir/rgw.pid" poll 10 http_ok "$S3_URL/" && return 0
  if ! live_pid "$dir/mon.pid" >/dev/null || ! live_pid "$dir/osd.pid" >/dev/null; then
    echo "ceph-rgw needs ceph's monitor and OSD: scripts/services.sh start ceph" >&2
    exit 1
  fi
  : > "$dir/log/ceph-client.rgw.a.log"  # on failure, show this start's errors only
  daemon_spawn "$dir/rgw.pid" "$dir/log/rgw.out" radosgw -f -n client.rgw.a -c "$dir/ceph.conf"
  await ceph-rgw "$dir/rgw.pid" "$dir/log/ceph-client.rgw.a.log" 60 http_ok "$S3_URL/"
  echo "ceph-rgw running (pid $(cat "$dir/rgw.pid")): $S3_URL"
}

ceph_start() {
  local dir=$state/ceph
  need ceph "ceph-mon ceph-osd ceph-common radosgw python3-rados" ceph-mon ceph-osd radosgw ceph \
    radosgw-admin
  # The OSD keeps its objects in memory: without monitor and OSD (or after a bootstrap that
  # did not finish) there is nothing to keep.
  if ! live_pid "$dir/mon.pid" >/dev/null || ! live_pid "$dir/osd.pid" >/dev/null \
     || [ ! -f "$dir/bootstrapped" ]; then
    ceph_stop >/dev/null
    ceph_bootstrap "$dir"
  fi
  ceph_rgw_start
  ceph_s3_setup
  echo "ceph running: S3 $S3_URL (region $S3_REGION, access key $S3_ACCESS_KEY), bucket $S3_BUCKET"
}

ceph_stop() {
  local i daemon
  for (( i = ${#CEPH_DAEMONS[@]} - 1; i >= 0; i-- )); do
    daemon=${CEPH_DAEMONS[i]}
    daemon_stop "${daemon%%:*}" "$state/ceph/${daemon#*:}.pid"
  done
}

ceph_status() {
  local daemon status=0
  for daemon in "${CEPH_DAEMONS[@]}"; do
    daemon_status "${daemon%%:*}" "$state/ceph/${daemon#*:}.pid" || status=$?
  done
  return "$status"
}

ceph_env() {
  echo "export AWS_ENDPOINT_URL=$S3_URL"
  echo "export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY"
  echo "export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY"
  echo "export AWS_REGION=$S3_REGION"
}

ceph_rgw_stop() { daemon_stop ceph-rgw "$state/ceph/rgw.pid"; }
ceph_rgw_status() { daemon_status ceph-rgw "$state/ceph/rgw.pid"; }
ceph_rgw_env() { ceph_env; }

# ---------------------------------------------------------------------------------------------

# run ACTION: NAME's own function for ACTION (kafka_stop, ceph_rgw_start, ...), else the
# generic one for a daemon with its pid in .services/NAME/NAME.pid.
run() {
  local own=${name//-/_}_$1
  if declare -F "$own" >/dev/null; then
    "$own"
  else
    case "$1" in
      stop|status) "daemon_$1" "$name" "$state/$name/$name.pid" ;;
      env) ;;
    esac
  fi
}

case " $services " in
  *" $name "*) ;;
  *) echo "unknown service: $name (known: ${services// /, })" >&2; exit 2 ;;
esac
case "$action" in
  start|stop|status|env) run "$action" ;;
  restart) run stop; run start ;;
  *) usage ;;
esac
