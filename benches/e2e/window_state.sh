#!/usr/bin/env bash
# Window state against its raw size (issue #17): the resident memory of count windows holding
# 60 steps x 8 features for N devices (default 100,000: 192 MB of f32), against a run of the
# same pipeline with 1,000 devices (whose state is negligible).
#
#   benches/e2e/window_state.sh [--devices N]
#
# Input (generated once): CSV, N devices round robin, 60 readings each, 8 features, event time
# +1 ms a line. Pipeline: file -> normalize (csv) -> count windows of 60 readings sliding by
# 60 -> stats -> blackhole, one worker; every device's window is full at the end of the input.
# Peak RSS (VmHWM, /usr/bin/time's maximum resident set) of each run; prints
#
#   devices N raw_mb R rss_mb A baseline_rss_mb B state_mb (A-B) ratio (A-B)/R per_device_bytes (A-B)/N
#
# Uses TIDEWATCH_BIN, or target/release/tidewatch (built when missing; the edge feature set is
# enough).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
devices=100000
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) devices=$2; shift 2 ;;
    *) echo "usage: $0 [--devices N]" >&2; exit 2 ;;
  esac
done
bin=${TIDEWATCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/tidewatch}
[ -x "$bin" ] || cargo build --release --bin tidewatch --no-default-features --features mqtt
source benches/lib.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
steps=60
baseline_devices=1000

# generate N FILE: N devices x 60 readings of 8 features.
generate() {
  awk -v n="$1" -v steps="$steps" 'BEGIN {
    print "device,ts,f1,f2,f3,f4,f5,f6,f7,f8"
    t = 1700000000000
    for (s = 0; s < steps; s++)
      for (d = 0; d < n; d++)
        printf "dev-%06d,%d,%d.5,%d,%d.25,1.5,2.5,%d,0.125,%d\n", d, t++, s, d % 13, s % 7, d % 5, s
  }' > "$2"
}

# pipeline_toml FILE: the pipeline over FILE.
pipeline_toml() {
  cat <<TOML
[pipeline]
name = "window-state"
workers = 1
http_address = ""
out_of_orderness_ms = 0

[sources.in]
type = "file"
path = "$1"
header = true

[transforms.readings]
type = "normalize"
inputs = ["in"]
format = "csv"
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_readings = $steps
slide_readings = $steps

[transforms.scores]
type = "stats"
inputs = ["windows"]

[sinks.out]
type = "blackhole"
inputs = ["scores"]
TOML
}

# peak_kb N: generates the input of N devices, runs the pipeline over it, prints its peak RSS.
peak_kb() {
  generate "$1" "$work/in-$1.csv"
  pipeline_toml "$work/in-$1.csv" > "$work/p-$1.toml"
  /usr/bin/time -f '%M' -o "$work/time-$1" "$bin" --log-level warn run "$work/p-$1.toml" \
    >/dev/null 2>"$work/log-$1" || { cat "$work/log-$1" >&2; return 1; }
  rm -f "$work/in-$1.csv"
  cat "$work/time-$1"
}

baseline=$(peak_kb "$baseline_devices")
full=$(peak_kb "$devices")
raw_mb=$(calc "$devices * $steps * 8 * 4 / 1048576")
state_mb=$(calc "($full - $baseline) / 1024")
printf 'devices %d raw_mb %.1f rss_mb %.1f baseline_rss_mb %.1f state_mb %.1f ratio %.2f per_device_bytes %.0f\n' \
  "$devices" "$raw_mb" "$(calc "$full / 1024")" "$(calc "$baseline / 1024")" "$state_mb" \
  "$(calc "$state_mb / $raw_mb")" "$(calc "($full - $baseline) * 1024 / $devices")"
