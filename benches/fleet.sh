#!/usr/bin/env bash
# The fleet view at scale (#14): readings/s through `enrich` + `fleet` with a catalog of N
# devices, against the same pipeline without them, side by side in one run; and what the
# catalog arrangement and the fleet state cost in memory per device.
#
#   benches/fleet.sh [--devices N] [--readings-per-device R] [--runs K] [--alike]
#                                       # defaults 100000, 20, 3
#
# --alike: every device reads the same values (no noise), so almost all devices score alike:
# the worst case of `fleet`'s top-N, which then ranks every device each round.
#
# Input (generated once): a catalog of N devices (CSV: 50 sites, 5 asset types, an owner per
# site, a free label), and N x R readings as JSON lines, devices round robin, event time
# +1 ms a line. Both pipelines run file -> normalize -> count windows of 10 (slide 10) ->
# stats, on one worker; `with` adds enrich (catalog and scores) -> fleet (top 10,
# require_catalog) -> blackhole, `without` sends the scores to a blackhole. Both also run on
# an empty readings file (`without0`, `with0`): what `with0` takes more than `without0` is the
# catalog's load (a one-off per catalog change), and the steady-state ratio leaves both
# start-ups out: (without - without0) / (with - with0), in seconds. The runs are interleaved
# (without, with, without0, with0, without ...), K each; medians. Prints:
#
#   devices N readings M without X/s with Y/s ratio Y/X rss_without_mb A rss_with_mb B per_device_bytes (B-A)/N
#   catalog_load_s L steady_state_ratio S
#
# Uses TIDEWATCH_BIN, or target/release/tidewatch (built when missing; the edge feature
# set, `--no-default-features --features mqtt`, is enough and builds quicker).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
devices=100000
per_device=20
runs=3
alike=0
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) devices=$2; shift 2 ;;
    --readings-per-device) per_device=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --alike) alike=1; shift ;;
    *) echo "usage: $0 [--devices N] [--readings-per-device R] [--runs K] [--alike]" >&2; exit 2 ;;
  esac
done
bin=${TIDEWATCH_BIN:-$root/target/release/tidewatch}
[ -x "$bin" ] || cargo build --release --bin tidewatch --no-default-features --features mqtt
source benches/lib.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" "$devices" "$per_device" "$alike" <<'PY'
import sys
work, devices, per_device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
alike = sys.argv[4] == "1"
with open(f"{work}/devices.csv", "w") as f:
    f.write("device,site,asset,owner,line\n")
    for d in range(devices):
        f.write(f"dev-{d:06d},site-{d % 50},asset-{d % 5},ops-{d % 50},{d % 7}\n")
base = 1_700_000_000_000
with open(f"{work}/readings.jsonl", "w") as f:
    lines = []
    for i in range(devices * per_device):
        d = i % devices
        # a slow wave per device, noise (a fixed hash of the line: the same input every run),
        # and a jump now and then so some windows are anomalous
        noise = 0 if alike else (i * 2654435761 % 10007) / 5003.5
        a = (i // devices) % 10 + noise + (25 if (d * 7 + i // devices) % 97 == 0 else 0)
        lines.append(f'{{"device":"dev-{d:06d}","ts":{base + i},"a":{a:.3f},"b":{d % 13}}}\n')
        if len(lines) == 100_000:
            f.writelines(lines)
            lines = []
    f.writelines(lines)
PY
readings=$((devices * per_device))

# pipeline_toml WITH: the pipeline, with enrich and fleet when WITH is 1.
pipeline_toml() {
  cat <<TOML
[pipeline]
name = "fleet-bench"
workers = 1
http_address = ""
out_of_orderness_ms = 0

[sources.in]
type = "file"
path = "$work/readings.jsonl"

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["a", "b"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_readings = 10
slide_readings = 10

[transforms.scores]
type = "stats"
inputs = ["windows"]
warmup_windows = 1
threshold = 3.0
TOML
  if [ "$1" = 1 ]; then
    cat <<TOML

[sources.devices]
type = "catalog"
path = "$work/devices.csv"
watch = false

[transforms.enriched]
type = "enrich"
inputs = ["devices", "scores"]

[transforms.rollups]
type = "fleet"
inputs = ["devices", "enriched.matched"]
top = 10
require_catalog = true

[sinks.out]
type = "blackhole"
inputs = ["rollups", "enriched.unmatched"]
TOML
  else
    cat <<TOML

[sinks.out]
type = "blackhole"
inputs = ["scores"]
TOML
  fi
}
pipeline_toml 0 > "$work/without.toml"
pipeline_toml 1 > "$work/with.toml"
: > "$work/empty.jsonl"
for name in without with; do
  sed "s|$work/readings.jsonl|$work/empty.jsonl|" "$work/$name.toml" > "$work/${name}0.toml"
done

# run NAME: runs the pipeline to the end of its input; prints "seconds peak_rss_kb".
run() {
  /usr/bin/time -f '%e %M' -o "$work/$1.time" "$bin" --log-level warn run "$work/$1.toml" \
    >/dev/null 2>"$work/$1.log" || { cat "$work/$1.log" >&2; return 1; }
  cat "$work/$1.time"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

for name in without with without0 with0; do : > "$work/$name.runs"; done
for _ in $(seq "$runs"); do
  for name in without with without0 with0; do
    run "$name" >> "$work/$name.runs"
  done
done
rate() { awk -v n="$readings" '{ print n / $1 }' "$work/$1.runs" | median; }
rss() { awk '{ print $2 / 1024 }' "$work/$1.runs" | median; }
seconds() { awk '{ print $1 }' "$work/$1.runs" | median; }
without=$(rate without)
with=$(rate with)
rss_without=$(rss without)
rss_with=$(rss with)
printf 'devices %d readings %d without %.0f/s with %.0f/s ratio %.3f rss_without_mb %.1f rss_with_mb %.1f per_device_bytes %.0f\n' \
  "$devices" "$readings" "$without" "$with" "$(calc "$with / $without")" "$rss_without" "$rss_with" \
  "$(calc "($rss_with - $rss_without) * 1048576 / $devices")"
printf 'catalog_load_s %.2f steady_state_ratio %.3f\n' \
  "$(calc "$(seconds with0) - $(seconds without0)")" \
  "$(calc "($(seconds without) - $(seconds without0)) / ($(seconds with) - $(seconds with0))")"
