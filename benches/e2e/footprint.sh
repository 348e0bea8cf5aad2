#!/usr/bin/env bash
# Footprint of the release binary (issue #17): its size, how long `tidewatch run` takes from
# exec to a ready /readyz, and the resident memory of the demo pipeline once it runs.
#
#   benches/e2e/footprint.sh [--runs N] [--settle SECONDS]     # defaults 5 and 10
#
# * size: the binary as built (release profile: line tables) and stripped (`strip`, a copy);
# * start-to-ready: pipelines/demo.toml (simulator -> normalize -> 10 s windows -> stats ->
#   stdout; no model) started with `--http-address 127.0.0.1:PORT`, /readyz polled every 2 ms
#   until it answers 200; the median of N starts;
# * idle RSS: the same pipeline (20 simulated pumps at 200 readings/s, output to /dev/null)
#   after SECONDS of running: VmRSS and VmHWM from /proc/PID/status, the median of N.
# Uses TIDEWATCH_BIN, or the release binary (built if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
runs=5
settle=10
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --settle) settle=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--settle SECONDS]" >&2; exit 2 ;;
  esac
done
bin=${TIDEWATCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/tidewatch}
[ -x "$bin" ] || cargo build --release --bin tidewatch
source benches/lib.sh
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

cp "$bin" "$work/stripped" && strip "$work/stripped"
printf 'binary %s: %.1f MB as built, %.1f MB stripped\n' "$bin" \
  "$(calc "$(stat -c %s "$bin") / 1000000")" "$(calc "$(stat -c %s "$work/stripped") / 1000000")"

: > "$work/ready"
: > "$work/rss"
: > "$work/hwm"
for run in $(seq "$runs"); do
  http=127.0.0.1:$(free_port)
  start=$(now)
  "$bin" --log-level warn run pipelines/demo.toml --http-address "$http" > /dev/null &
  pid=$!
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$http/readyz" 2>/dev/null)" = 200 ]; do
    kill -0 "$pid" 2>/dev/null || { echo "tidewatch exited before it was ready" >&2; exit 1; }
    sleep 0.002
  done
  calc "($(now) - $start) * 1000" >> "$work/ready"
  echo >> "$work/ready"
  sleep "$settle"
  awk '/^VmRSS:/ { print $2 / 1024 }' "/proc/$pid/status" >> "$work/rss"
  awk '/^VmHWM:/ { print $2 / 1024 }' "/proc/$pid/status" >> "$work/hwm"
  kill -INT "$pid"
  wait "$pid" || true
  pid=
done
printf 'start-to-ready (pipelines/demo.toml, no model): median %.0f ms of %d (%s ms)\n' \
  "$(median < "$work/ready")" "$runs" "$(awk 'NF { printf "%.0f ", $1 }' "$work/ready" | sed 's/ $//')"
printf 'RSS of pipelines/demo.toml after %d s: median %.1f MB (peak %.1f MB) of %d\n' \
  "$settle" "$(median < "$work/rss")" "$(median < "$work/hwm")" "$runs"
