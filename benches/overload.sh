#!/usr/bin/env bash
# Overload: a producer at 10x what the pipeline can sustain, for 60 s, into a pipeline whose
# sink is slowed on purpose; over MQTT (QoS 1) and over Kafka, side by side.
#
#   benches/overload.sh [--seconds S] [--sink-rate R] [--source mqtt|kafka|both]
#                                         # defaults 60, 1000 records/s, both
#
# The pipeline: source -> normalize -> blackhole `slow` taking R records/s (its
# `records_per_sec`), with the default `max_in_flight_records` (100000). The producer
# (`tidewatch simulate`) publishes 10 x R messages/s for S seconds, then stops; the pipeline
# drains what the broker holds at R/s; then a second, gentle phase (R/2 messages/s for 10 s)
# shows the throughput has recovered: it is through within a few seconds of its end.
# Sampled every second: RSS (/proc) and `tidewatch_in_flight_records`. Prints per source:
#
#   source K sent N through M lost 0 twice D peak_rss_mb P peak_in_flight F sink_rate X/s ...
#
# (`twice`: records the sink got a second time; MQTT QoS 1 and Kafka are at-least-once)
#
# and fails unless nothing was lost and the in-flight count stayed under its bound plus
# slack. Needs the services of scripts/services.sh (mosquitto, kafka; started here).
# Uses the release binary (TIDEWATCH_BIN, or target/release/tidewatch, built if missing).
# About 11 x S seconds per source; both sources run at once.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=60
sink_rate=1000
sources="mqtt kafka"
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --sink-rate) sink_rate=$2; shift 2 ;;
    --source) case "$2" in both) sources="mqtt kafka" ;; mqtt|kafka) sources=$2 ;; *) echo "--source mqtt|kafka|both" >&2; exit 2 ;; esac; shift 2 ;;
    *) echo "usage: $0 [--seconds S] [--sink-rate R] [--source mqtt|kafka|both]" >&2; exit 2 ;;
  esac
done
bin=${TIDEWATCH_BIN:-$root/target/release/tidewatch}
[ -x "$bin" ] || cargo build --release --bin tidewatch
for source in $sources; do
  case "$source" in
    mqtt) scripts/services.sh start mosquitto >/dev/null ;;
    kafka) scripts/services.sh start kafka >/dev/null ;;
  esac
done
source benches/lib.sh

bound=100000
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# source_toml SOURCE ID: the [sources.in] table.
source_toml() {
  case "$1" in
    mqtt) mqtt_source_toml "$2" ;;
    kafka) cat <<TOML
[sources.in]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = ["$2"]
group_id = "$2"
start_from = "earliest"
TOML
    ;;
  esac
}

# produce SOURCE ID COUNT RATE: publishes COUNT simulated readings at RATE messages/s.
produce() {
  local target
  case "$1" in
    mqtt) target=(--mqtt mqtt://127.0.0.1:1883 --qos 1 --topic "$2/{device}" --client-id "$2-pub-$RANDOM") ;;
    kafka) target=(--kafka 127.0.0.1:9092 --topic "$2") ;;
  esac
  "$bin" --log-level warn simulate "${target[@]}" --devices 100 --count "$3" --rate "$4" \
    >/dev/null 2>>"$work/$2.simulate.log"
}

# run_source SOURCE: the whole run of one source; prints its line, returns 1 on a loss.
run_source() {
  local source=$1 id="overload-$1-$$" http pid through sent peak_in_flight=0 in_flight
  http=127.0.0.1:$(free_port)
  cat > "$work/$id.toml" <<TOML
[pipeline]
name = "$id"
workers = 2
http_address = "$http"
max_in_flight_records = $bound

$(source_toml "$source" "$id")

$(readings_toml)

[sinks.slow]
type = "blackhole"
inputs = ["readings"]
records_per_sec = $sink_rate
TOML
  start_pipeline "$bin" "$work/$id.toml" "$http" "$work/$id.log" || return 1
  through() { metric_sum "$http" tidewatch_component_received_events_total 'component_id="slow"'; }
  ( while kill -0 "$pid" 2>/dev/null; do
      echo "$(awk '/^VmRSS/ { print $2 / 1024 }' "/proc/$pid/status" 2>/dev/null || echo 0)" \
        "$(curl -s "http://$http/metrics" 2>/dev/null | awk '$1 == "tidewatch_in_flight_records" { print $2 + 0; found = 1 } END { if (!found) print 0 }')"
      sleep 1
    done ) > "$work/$id.samples" &
  local sampler=$!
  # The overload: 10 x the sink's rate for S seconds.
  local overload=$((10 * sink_rate * seconds))
  local started
  started=$(now)
  produce "$source" "$id" "$overload" "$((10 * sink_rate))"
  local produced_in
  produced_in=$(calc "$(now) - $started")
  local after_overload
  after_overload=$(through)
  local drain_start
  drain_start=$(now)
  # Drain: wait until everything is through (or nothing moved for 60 s).
  local last=-1 still=0
  while :; do
    sent=$(through)
    [ "$sent" -ge "$overload" ] && break
    if [ "$sent" -eq "$last" ]; then still=$((still + 1)); else still=0; last=$sent; fi
    [ "$still" -ge 600 ] && { echo "$source: no progress for 60 s at $sent of $overload" >&2; break; }
    sleep 0.1
  done
  local drained_in sink_measured
  drained_in=$(calc "$(now) - $drain_start")
  sink_measured=$(calc "($sent - $after_overload) / $drained_in")
  # Recovery: R/2 messages/s for 10 s, then how long until the last is through.
  local gentle=$((sink_rate * 5)) end recovered_in
  produce "$source" "$id" "$gentle" "$((sink_rate / 2))"
  end=$(now)
  local waited=0
  while [ "$(through)" -lt $((overload + gentle)) ] && [ "$waited" -lt 1200 ]; do
    sleep 0.05
    waited=$((waited + 1))
  done
  recovered_in=$(calc "$(now) - $end")
  sent=$(through)
  local peak
  peak=$(awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")
  kill -INT "$pid"
  wait "$pid" || { cat "$work/$id.log" >&2; echo "$source: the pipeline did not stop cleanly" >&2; return 1; }
  kill "$sampler" 2>/dev/null || true
  peak_in_flight=$(awk '$2 > m { m = $2 } END { printf "%d", m + 0 }' "$work/$id.samples")
  # Through more than sent: records delivered twice (at-least-once), counted apart.
  local total=$((overload + gentle)) lost=0 twice=0
  if [ "$sent" -ge "$total" ]; then twice=$((sent - total)); else lost=$((total - sent)); fi
  echo "source $source sent $total through $sent lost $lost twice $twice peak_rss_mb $peak" \
    "peak_in_flight $peak_in_flight sink_rate $(printf '%.0f' "$sink_measured")/s (configured $sink_rate per worker)" \
    "published_in ${produced_in%.*} s recovered_in $(printf '%.3f' "$recovered_in") s"
  [ "$lost" -eq 0 ] && [ "$peak_in_flight" -le $((bound + bound / 2)) ]
}

status=0
for source in $sources; do
  run_source "$source" > "$work/$source.out" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || status=1
done
pids=()
for source in $sources; do cat "$work/$source.out"; done
exit "$status"
