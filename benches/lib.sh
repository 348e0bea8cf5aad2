# Helpers of the benches/*.sh scripts (sourced, not run).

now() { date +%s.%N; }
# free_port: a TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# mqtt_source_toml ID: the [sources.in] table of an MQTT source on the test broker, QoS 1,
# reading ID/+ with the client id ID-in.
mqtt_source_toml() {
  cat <<TOML
[sources.in]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["$1/+"]
qos = 1

[sources.in.connection]
client_id = "$1-in"
TOML
}
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }

# metric_sum HTTP_ADDRESS NAME REGEX: the sum of the samples of metric NAME whose labels match
# REGEX (an awk regular expression), as an integer; 0 while /metrics does not answer.
metric_sum() {
  curl -s "http://$1/metrics" 2>/dev/null \
    | awk -v name="$2" -v labels="$3" '$1 ~ ("^" name "\\{") && $1 ~ labels { sum += $2 } END { printf "%d\n", sum + 0 }'
}

# normalize_received HTTP_ADDRESS: records the pipeline's normalize transforms received, summed
# over workers (0 while /metrics does not answer).
normalize_received() {
  metric_sum "$1" tidewatch_component_received_events_total 'component_type="normalize"'
}

# time_pipeline BINARY PIPELINE HTTP_ADDRESS COUNT: runs the pipeline until its normalize has
# received COUNT records, stops it (SIGINT) and prints the seconds from its start to then.
time_pipeline() {
  local bin=$1 pipeline=$2 http=$3 count=$4 start pid received
  start=$(now)
  "$bin" --log-level warn run "$pipeline" >/dev/null &
  pid=$!
  while :; do
    received=$(normalize_received "$http")
    [ "${received%.*}" -ge "$count" ] && break
    kill -0 "$pid" 2>/dev/null || { echo "tidewatch exited early" >&2; return 1; }
    sleep 0.01
  done
  calc "$(now) - $start"
  kill -INT "$pid"
  wait "$pid" || true
}

# start_pipeline BINARY PIPELINE HTTP_ADDRESS LOG: runs the pipeline in the background (its
# pid in $pid, its stderr in LOG) and waits until its /readyz answers; fails, with the log,
# when it exits first.
start_pipeline() {
  "$1" --log-level warn run "$2" >/dev/null 2>"$4" &
  pid=$!
  until curl -sf "http://$3/readyz" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { cat "$4" >&2; echo "the pipeline did not start" >&2; return 1; }
    sleep 0.1
  done
}

# readings_toml: the `normalize` table (`readings`) of the simulator's payloads from the
# source `in`.
readings_toml() {
  cat <<TOML
[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["vibration", "current", "pressure", "temperature", "flow"]
label_field = "anomaly"
TOML
}

# scoring_toml: the stages every bench pipeline shares after its source `in` (the simulator's
# payloads): normalize -> 10 s windows -> stats (`baseline`).
scoring_toml() {
  readings_toml
  cat <<TOML

[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 10000

[transforms.baseline]
type = "stats"
inputs = ["windows"]
TOML
}

# kafka_bench_toml TOPIC GROUP WORKERS HTTP_ADDRESS STOP_AT_END: prints the Kafka benchmark
# pipeline (kafka -> normalize -> 10 s windows -> stats -> blackhole) on the broker
# 127.0.0.1:9092.
kafka_bench_toml() {
  cat <<TOML
[pipeline]
name = "kafka-bench"
workers = $3
out_of_orderness_ms = 0
http_address = "$4"

[sources.in]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = ["$1"]
group_id = "$2"
stop_at_end = $5

$(scoring_toml)
[sinks.out]
type = "blackhole"
inputs = ["baseline", "readings.errors", "in.errors"]
TOML
}
