#!/usr/bin/env bash
# Kafka ingest: tidewatch (kafka -> normalize -> window -> stats -> blackhole, offsets stored
# as normalize finishes each batch) against a raw librdkafka consumer of the same topic
# (connectors/examples/kafka_raw_consume.rs: the same bundled librdkafka, counting messages
# and nothing else).
#
#   benches/kafka_ingest.sh [MESSAGES] [WORKERS]      # default 1000000 messages, 2 workers
#
# MESSAGES simulator readings (about 190 bytes of JSON each, 1000 devices, keyed by device)
# are produced once into a fresh topic (4 partitions) with `tidewatch simulate --kafka`; then
# each consumer reads the whole topic from its start and is timed until it has taken them all
# (tidewatch: the `received` counter of normalize on /metrics, summed over workers;
# the raw consumer: from its assignment to the last message). tidewatch's time includes
# joining the group. Prints both rates and their ratio.
# Uses the release binaries (built if missing) and the broker of scripts/services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
messages=${1:-1000000}
workers=${2:-2}
brokers=127.0.0.1:9092
target=${CARGO_TARGET_DIR:-$root/target}/release
http=127.0.0.1:9897
topic="bench-kafka-$$-$(date +%s)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

scripts/services.sh start kafka >/dev/null
# Only what the benchmark runs: no inference backend.
[ -x "$target/tidewatch" ] && [ -x "$target/examples/kafka_raw_consume" ] || {
  cargo build --release -p tidewatch --no-default-features --features mqtt,kafka --bin tidewatch
  cargo build --release -p tidewatch-connectors --example kafka_raw_consume
}
source benches/lib.sh

echo "producing $messages readings to $topic ..."
"$target/tidewatch" --log-level warn simulate --kafka "$brokers" --topic "$topic" \
  --devices 1000 --count "$messages" --interval-ms 1000 2>&1 | tail -n 1

# --- raw librdkafka ---------------------------------------------------------------------------
raw=$("$target/examples/kafka_raw_consume" "$brokers" "$topic" "$messages")
echo "raw:       $raw"
raw_secs=$(echo "$raw" | awk '{ for (i = 1; i <= NF; i++) if ($i == "in") print $(i + 1) }')

# --- tidewatch --------------------------------------------------------------------------------
kafka_bench_toml "$topic" "$topic-tidewatch" "$workers" "$http" false > "$work/bench.toml"
tw_secs=$(time_pipeline "$target/tidewatch" "$work/bench.toml" "$http" "$messages")

raw_rate=$(calc "$messages / $raw_secs")
tw_rate=$(calc "$messages / $tw_secs")
printf '\nKafka ingest of %d readings (one topic, 4 partitions, read from the start)\n' "$messages"
printf '  raw librdkafka consume  %8.2f s  %9.0f readings/s\n' "$raw_secs" "$raw_rate"
printf '  tidewatch (%d workers)   %8.2f s  %9.0f readings/s  (kafka -> normalize -> window -> stats -> blackhole)\n' "$workers" "$tw_secs" "$tw_rate"
printf '  ratio tidewatch / raw: %.3f\n' "$(calc "$tw_rate / $raw_rate")"
