#!/usr/bin/env bash
# Soak: N messages over MQTT (QoS 1), a fraction of them malformed in six ways, through an
# edge pipeline (mqtt -> normalize -> 10 s windows -> stats -> blackhole; every error output
# -> blackhole), published while the pipeline runs.
#
#   benches/soak.sh [--messages N] [--malformed FRACTION]     # defaults 1000000 and 0.3
#
# `tidewatch simulate --malformed` replaces the fraction with truncated JSON, bytes that are
# not UTF-8, messages without a timestamp, timestamps that are not times, JSON that is not an
# object and empty payloads. Counted from the pipeline's /metrics: good = readings `normalize`
# emitted, errors = messages on the error outputs of the source and of `normalize`. RSS is
# sampled every second from /proc; the slope is a least-squares fit over the second half of
# the run. Prints, last:
#
#   sent N good G errors E lost L peak_rss_mb R
#   rss_slope_mb_per_min S (K samples in the second half), lost L
#
# Uses the release binary (TIDEWATCH_BIN, or target/release/tidewatch, built if missing) and
# the broker of scripts/services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
messages=1000000
malformed=0.3
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) messages=$2; shift 2 ;;
    --malformed) malformed=$2; shift 2 ;;
    *) echo "usage: $0 [--messages N] [--malformed FRACTION]" >&2; exit 2 ;;
  esac
done
bin=${TIDEWATCH_BIN:-$root/target/release/tidewatch}
[ -x "$bin" ] || cargo build --release --bin tidewatch
scripts/services.sh start mosquitto >/dev/null
source benches/lib.sh

run_id="soak-$$"
http=127.0.0.1:$(free_port)
work=$(mktemp -d)
pid=
sampler=
cleanup() {
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/soak.toml" <<TOML
[pipeline]
name = "soak"
workers = 2
http_address = "$http"

$(mqtt_source_toml "$run_id")

$(scoring_toml)
[sinks.scores]
type = "blackhole"
inputs = ["baseline"]

[sinks.rejects]
type = "blackhole"
inputs = ["in.errors", "readings.errors", "windows.late"]
TOML

start_pipeline "$bin" "$work/soak.toml" "$http" "$work/run.log"
( while kill -0 "$pid" 2>/dev/null; do
    awk -v t="$(date +%s.%N)" '/^VmRSS/ { print t, $2 / 1024 }' "/proc/$pid/status" 2>/dev/null || true
    sleep 1
  done ) > "$work/rss" &
sampler=$!

published=$("$bin" --log-level warn simulate --mqtt mqtt://127.0.0.1:1883 --devices 100 \
  --count "$messages" --qos 1 --topic "$run_id/{device}" --malformed "$malformed" \
  --client-id "$run_id-pub" 2>&1 | tail -n 1)
echo "$published"
malformed_sent=$(sed -n 's/.*malformed \([0-9]*\)).*/\1/p' <<<"$published")

good() { metric_sum "$http" tidewatch_component_sent_events_total 'component_id="readings"'; }
errors() { metric_sum "$http" tidewatch_component_errors_total 'component_id="(in|readings)"'; }
# Wait until every message is accounted for, or nothing moved for 60 s.
last=-1
still=0
while :; do
  total=$(( $(good) + $(errors) ))
  [ "$total" -ge "$messages" ] && break
  if [ "$total" -eq "$last" ]; then still=$((still + 1)); else still=0; last=$total; fi
  [ "$still" -ge 600 ] && { echo "no progress for 60 s at $total of $messages" >&2; break; }
  sleep 0.1
done
good=$(good)
errors=$(errors)
peak=$(awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")
kill -INT "$pid"
wait "$pid" || { cat "$work/run.log" >&2; echo "the pipeline did not stop cleanly" >&2; exit 1; }
pid=
kill "$sampler" 2>/dev/null || true
sampler=
lost=$(( messages - good - errors ))
# Least-squares slope of RSS (MB) against time (minutes) over the second half of the samples.
read -r slope samples < <(awk '{ t[NR] = $1; r[NR] = $2 } END {
  from = int(NR / 2) + 1; n = NR - from + 1
  if (n < 2) { print "0 " n; exit }
  for (i = from; i <= NR; i++) { x = (t[i] - t[from]) / 60; sx += x; sy += r[i]; sxx += x * x; sxy += x * r[i] }
  d = n * sxx - sx * sx
  printf "%.2f %d\n", (d > 0 ? (n * sxy - sx * sy) / d : 0), n }' "$work/rss")
echo "malformed sent $malformed_sent, errors counted $errors"
echo "sent $messages good $good errors $errors lost $lost peak_rss_mb $peak"
echo "rss_slope_mb_per_min $slope ($samples samples in the second half), lost $lost"
[ "$lost" -eq 0 ] && [ "$errors" = "$malformed_sent" ]
