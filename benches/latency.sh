#!/usr/bin/env bash
# Alert latency of the feedback loop: from publishing an anomalous reading over MQTT to
# receiving the `anomaly_open` command the pipeline publishes for it.
#
#   benches/latency.sh [--quick]
#
# The pipeline is pipelines/feedback-control.toml (mqtt -> normalize -> 10-reading count
# windows -> the pump-ae autoencoder -> threshold -> mqtt commands) with
# out_of_orderness_ms = 0 and n = m = hysteresis = 1, the release binary, and the Mosquitto of
# scripts/services.sh. The probe (benches/latency-probe, Rust, MQTT straight on its sockets)
# publishes the readings (event time = the wall clock at publishing), subscribes to the
# commands and prints, per case,
#
#   rate R pumps P p50 X ms p99 Y ms max Z ms (K/K alerts; /metrics p99 <= B ms)
#
# Cases: one pump at 1, 5, 50 and 500 readings/s, and 1000 pumps at 1 reading/s each; with
# --quick only one pump at 5 and at 50 readings/s. A fresh pipeline runs each case.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
quick=0
[ "${1:-}" = "--quick" ] && quick=1
bin=${TIDEWATCH_BIN:-$root/target/release/tidewatch}
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

scripts/services.sh start mosquitto >/dev/null
if [ -z "${TIDEWATCH_BIN:-}" ]; then
  cargo build --release --quiet --bin tidewatch
fi
cargo build --release --quiet -p tidewatch-latency-probe
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in /*) ;; *) target_dir=$root/$target_dir ;; esac
probe=$target_dir/release/latency-probe

sed -e 's/^out_of_orderness_ms = .*/out_of_orderness_ms = 0/' \
    -e 's/^n = .*/n = 1/' -e 's/^m = .*/m = 1/' -e 's/^hysteresis = .*/hysteresis = 1/' \
    -e "s#\"../models/pump-ae\"#\"$root/models/pump-ae\"#" \
    pipelines/feedback-control.toml > "$work/latency.toml"
grep -q '^out_of_orderness_ms = 0' "$work/latency.toml" && grep -q '^hysteresis = 1' "$work/latency.toml" \
  || { echo "could not derive the latency pipeline from pipelines/feedback-control.toml" >&2; exit 1; }

source benches/lib.sh

# run_case RATE PUMPS ANOMALIES
run_case() {
  local prefix="latency-$$-$1-$2" port
  port=$(free_port)
  FEEDBACK_TOPIC_PREFIX=$prefix FEEDBACK_CLIENT_ID=$prefix TIDEWATCH_HTTP_ADDRESS=127.0.0.1:$port \
    "$bin" --log-level warn run "$work/latency.toml" >/dev/null 2>"$work/tidewatch.log" &
  pid=$!
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/tidewatch.log" >&2; exit 1; }
    sleep 0.1
  done
  "$probe" --prefix "$prefix" --rate "$1" --pumps "$2" \
    --anomalies "$3" --metrics "http://127.0.0.1:$port/metrics"
  kill -INT "$pid"
  wait "$pid" || true
  pid=
}

if [ "$quick" = 1 ]; then
  run_case 5 1 10
  run_case 50 1 20
else
  run_case 1 1 3
  run_case 5 1 10
  run_case 50 1 40
  run_case 500 1 100
  run_case 1 1000 1000
fi
