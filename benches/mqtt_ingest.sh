#!/usr/bin/env bash
# Sustained QoS 1 ingest: tidewatch (mqtt -> normalize -> blackhole, acks withheld until
# normalize processed each batch) against `mosquitto_sub -q 1` (acks at once, prints to
# /dev/null), each draining the same number of messages from the same broker.
#
#   benches/mqtt_ingest.sh [MESSAGES]        # default 200000
#
# For each consumer: a persistent session subscribed to the topic is created, MESSAGES
# simulator messages (about 190 bytes of JSON each) are published into it with
# `tidewatch simulate` while the consumer is away, then the consumer is started and timed
# until it has taken them all (tidewatch: its `received` counter on /metrics; mosquitto_sub:
# `-C MESSAGES`). Both times include connecting. Prints both rates and their ratio.
# Uses the release binary (built if missing) and the broker of scripts/services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
messages=${1:-200000}
url=mqtt://127.0.0.1:1883
bin=$root/target/release/tidewatch
http=127.0.0.1:9899
run_id="bench-$$"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

scripts/services.sh start mosquitto >/dev/null
[ -x "$bin" ] || cargo build --release --bin tidewatch
source benches/lib.sh

# Publishes the fleet's messages to TOPIC_PREFIX/<device>/data and waits for every PUBACK.
publish() {
  "$bin" --log-level warn simulate --mqtt "$url" --devices 100 --count "$messages" --qos 1 \
    --topic "$1/{device}/data" --wait-subscriber-secs 0 --client-id "$run_id-pub" 2>&1 | tail -n 1
}

# --- mosquitto_sub ----------------------------------------------------------------------------
topic=$run_id/sub
mosquitto_sub -h 127.0.0.1 -p 1883 -V mqttv5 -c -x 3600 -i "$run_id-sub" -q 1 -t "$topic/+/data" -W 1 \
  >/dev/null 2>&1 || true
echo "mosquitto_sub: $(publish "$topic")"
start=$(now)
mosquitto_sub -h 127.0.0.1 -p 1883 -V mqttv5 -c -x 3600 -i "$run_id-sub" -q 1 -t "$topic/+/data" \
  -C "$messages" >/dev/null
sub_secs=$(calc "$(now) - $start")

# --- tidewatch --------------------------------------------------------------------------------
topic=$run_id/tw
client=$run_id-tw
mosquitto_sub -h 127.0.0.1 -p 1883 -V mqttv5 -c -x 3600 -i "$client" -q 1 -t "$topic/+/data" -W 1 \
  >/dev/null 2>&1 || true
echo "tidewatch:     $(publish "$topic")"
cat > "$work/bench.toml" <<TOML
[pipeline]
name = "mqtt-ingest"
http_address = "$http"

[sources.in]
type = "mqtt"
url = "$url"
topics = ["$topic/+/data"]
qos = 1
connection = { client_id = "$client", session_expiry_secs = 3600 }

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["vibration", "current", "pressure", "temperature", "flow"]

[sinks.out]
type = "blackhole"
inputs = ["readings", "readings.errors", "in.errors"]
TOML
tw_secs=$(time_pipeline "$bin" "$work/bench.toml" "$http" "$messages")

sub_rate=$(calc "$messages / $sub_secs")
tw_rate=$(calc "$messages / $tw_secs")
printf '\nQoS 1 ingest of %d messages (drained from a persistent session)\n' "$messages"
printf '  mosquitto_sub -q 1  %8.2f s  %9.0f msg/s\n' "$sub_secs" "$sub_rate"
printf '  tidewatch           %8.2f s  %9.0f msg/s  (mqtt -> normalize -> blackhole)\n' "$tw_secs" "$tw_rate"
printf '  ratio tidewatch / mosquitto_sub: %.3f\n' "$(calc "$tw_rate / $sub_rate")"
