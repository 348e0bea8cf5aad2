#!/usr/bin/env bash
# One Kafka pipeline (kafka -> normalize -> 10 s windows -> stats -> blackhole) on the same
# topic as 1 process x 1 worker, 1 process x 2 workers and 2 processes x 1 worker (a cluster on
# loopback), interleaved, ROUNDS rounds; prints the median rate of each and the ratios against
# 1 x 1.
#
#   benches/cluster.sh [MESSAGES] [ROUNDS]      # default 1000000 messages, 3 rounds
#
# MESSAGES simulator readings (1000 devices, keyed by device) are produced once into a fresh
# topic (4 partitions). Each run reads the whole topic with `stop_at_end = true` and is timed
# from the start of its processes to their exit (start-up, the cluster's connections and the
# partitions' assignment included). Uses the release binary (built if missing) and the broker
# of scripts/services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
messages=${1:-1000000}
rounds=${2:-3}
brokers=127.0.0.1:9092
target=${CARGO_TARGET_DIR:-$root/target}/release
topic="bench-cluster-$$-$(date +%s)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

scripts/services.sh start kafka >/dev/null
[ -x "$target/tidewatch" ] || cargo build --release -p tidewatch --no-default-features --features mqtt,kafka --bin tidewatch
source benches/lib.sh

echo "producing $messages readings to $topic ..."
"$target/tidewatch" --log-level warn simulate --kafka "$brokers" --topic "$topic" \
  --devices 1000 --count "$messages" --interval-ms 1000 2>&1 | tail -n 1

# pipeline NAME WORKERS: writes the pipeline file (its own group, read to the end).
pipeline() {
  kafka_bench_toml "$topic" "$topic-$1-$RANDOM" "$2" "" true > "$work/$1.toml"
}

# run LAYOUT: prints the seconds one run of LAYOUT (1x1, 1x2, 2x1) takes.
run() {
  local start pids=() peers file="$work/$1.toml"
  start=$(now)
  case $1 in
    1x1) pipeline "$1" 1; "$target/tidewatch" --log-level warn run "$file" ;;
    1x2) pipeline "$1" 2; "$target/tidewatch" --log-level warn run "$file" ;;
    2x1)
      pipeline "$1" 1
      peers="127.0.0.1:$((17400 + RANDOM % 1000)),127.0.0.1:$((18400 + RANDOM % 1000))"
      for process in 0 1; do
        "$target/tidewatch" --log-level warn run "$file" \
          --processes 2 --process "$process" --peers "$peers" &
        pids+=($!)
      done
      for pid in "${pids[@]}"; do wait "$pid"; done
      ;;
  esac
  calc "$(now) - $start"
}

declare -A times
for round in $(seq 1 "$rounds"); do
  for layout in 1x1 1x2 2x1; do
    secs=$(run "$layout")
    times[$layout]="${times[$layout]:-} $secs"
    echo "round $round $layout: $secs s"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
for layout in 1x1 1x2 2x1; do
  m=$(echo "${times[$layout]}" | median)
  printf '%s: median %.2f s, %.0f readings/s\n' "$layout" "$m" "$(calc "$messages / $m")"
  eval "median_${layout}=$m"
done
printf 'ratio 1x2/1x1: %.2f\n' "$(calc "$median_1x1 / $median_1x2")"
printf 'ratio 2x1/1x1: %.2f\n' "$(calc "$median_1x1 / $median_2x1")"
