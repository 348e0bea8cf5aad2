"""Alert latency of the feedback loop, measured as a user sees it (benches/latency.sh runs it).

    latency.py --prefix PREFIX --rate R --pumps P --anomalies K [--metrics URL]

Publishes SKAB-like pump readings to PREFIX/<pump>/telemetry on the Mosquitto at
127.0.0.1:1883 (one connection, so readings reach the broker in publishing order), each pump at
R readings/s, the pumps' phases spread evenly over the period. The event time `ts` of a reading
is the wall clock when it is published. Every pump first sends `--warmup` normal readings (the
model's windows fill), then K anomalous readings in all (spread over the pumps), each followed
by `--spacing` normal readings (the anomaly leaves the 10-reading window and the alert closes
before the next one).

A subscriber on PREFIX/+/commands takes the time each `anomaly_open` command arrives; its
`time_ms` is the end of the window that opened it (the anomalous reading's ts + 1), which
names the reading. Latency = arrival - publishing of that reading (both on this process's
monotonic clock). Prints one line:

    rate R pumps P p50 X ms p99 Y ms max Z ms (K/K alerts; /metrics p99 <= B ms)

The last part is the pipeline's own view: the `tidewatch_sink_event_lag_seconds` histogram of
the sink that published the commands (the bucket holding its 99th percentile).
"""

import argparse
import heapq
import json
import math
import random
import socket
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent


def percentile(values, q):
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(values)))
    return values[rank - 1]


def nodelay(client):
    """No Nagle delay on the client's socket (paho leaves it on): the probe must add none."""
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def metrics_p99(url, sink):
    """Upper bound of the histogram bucket holding the 99th percentile, in ms."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    buckets = []
    for line in text.splitlines():
        if not line.startswith("tidewatch_sink_event_lag_seconds_bucket{"):
            continue
        if f'component_id="{sink}"' not in line:
            continue
        le = line.split('le="', 1)[1].split('"', 1)[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    buckets.sort()
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= 0.99 * total:
            return bound * 1000.0
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--rate", type=float, required=True, help="readings/s per pump")
    parser.add_argument("--pumps", type=int, default=1)
    parser.add_argument("--anomalies", type=int, required=True, help="anomalous readings in all")
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--spacing", type=int, default=14)
    parser.add_argument("--model", default=str(ROOT / "models/pump-ae/model.json"))
    parser.add_argument(
        "--pipeline",
        default=str(ROOT / "pipelines/feedback-control.toml"),
        help="the pipeline whose normalize `rename` names the payload fields",
    )
    parser.add_argument("--metrics", default=None, help="the pipeline's /metrics URL")
    parser.add_argument("--sink", default="commands")
    parser.add_argument("--wait", type=float, default=5.0, help="s to wait for the last alerts")
    args = parser.parse_args()

    spec = json.loads(Path(args.model).read_text())
    mean, std = spec["scaler"]["mean"], spec["scaler"]["std"]
    # The payload names the model's features as the pipeline's normalize expects them.
    pipeline = tomllib.loads(Path(args.pipeline).read_text())
    rename = pipeline["transforms"]["readings"].get("rename", {})
    names = [rename.get(feature, feature) for feature in spec["features"]]
    rng = random.Random(7)

    def payload(ts, anomalous):
        values = {}
        for i, name in enumerate(names):
            z = (8.0 if i % 2 == 0 else -8.0) if anomalous else rng.gauss(0.0, 0.3)
            values[name] = round(mean[i] + z * std[i], 6)
        values["ts"] = ts
        return json.dumps(values)

    # The schedule: (due offset s, pump, anomalous). Each pump's anomalies come after its
    # warm-up, `spacing` readings apart; the pumps take turns.
    per_pump = [args.anomalies // args.pumps + (1 if p < args.anomalies % args.pumps else 0)
                for p in range(args.pumps)]
    period = 1.0 / args.rate
    schedule = []
    spread = min(args.pumps, 5)  # the pumps' anomalies spread over 5 readings, not one burst
    count = args.warmup + spread + max(per_pump) * args.spacing + 2  # readings of every pump
    for pump in range(args.pumps):
        phase = period * pump / args.pumps
        offset = pump % spread
        anomalous = {args.warmup + offset + k * args.spacing for k in range(per_pump[pump])}
        for i in range(count):
            schedule.append((phase + i * period, pump, i in anomalous))
    heapq.heapify(schedule)

    published = {}  # (pump name, ts) -> monotonic publish time of an anomalous reading
    arrived = {}  # the same key -> monotonic arrival time of its anomaly_open
    lock = threading.Lock()
    done = threading.Event()

    def on_message(_client, _userdata, message):
        now = time.perf_counter()
        try:
            command = json.loads(message.payload)
        except ValueError:
            return
        if command.get("command") != "anomaly_open":
            return
        key = (command.get("device"), int(command.get("time_ms", 0)) - 1)
        with lock:
            arrived.setdefault(key, now)
            if len(arrived) >= args.anomalies:
                done.set()

    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{args.prefix}-sub")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect("127.0.0.1", 1883)
    nodelay(sub)
    sub.subscribe(f"{args.prefix}/+/commands", qos=1)
    sub.loop_start()
    if not subscribed.wait(10):
        sys.exit("the command subscription was not acknowledged")

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{args.prefix}-pub")
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", 1883)
    nodelay(pub)
    # No network thread for the publisher: `publish` then writes to the socket itself, at once
    # (with a thread it would wake that thread, which waits for the GIL). `loop(0)` after each
    # publish reads what the broker sends (CONNACK, keep-alive).
    # The subscriber's thread takes the GIL within 0.5 ms, not Python's default 5 ms.
    sys.setswitchinterval(0.0005)

    epoch_ms = time.time() * 1000.0
    start = time.perf_counter()
    last_ts = {}
    while schedule:
        due, pump, anomalous = heapq.heappop(schedule)
        delay = start + due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        now = time.perf_counter()
        # Event time = wall clock at publishing, never behind the pump's previous reading.
        ts = max(int(epoch_ms + (now - start) * 1000.0), last_ts.get(pump, 0))
        last_ts[pump] = ts
        device = f"pump-{pump}"
        if anomalous:
            with lock:
                published[(device, ts)] = now
        pub.publish(f"{args.prefix}/{device}/telemetry", payload(ts, anomalous), qos=0)
        pub.loop(timeout=0)
    done.wait(args.wait)
    pub.disconnect()
    sub.loop_stop()

    with lock:
        latencies = sorted(
            (arrived[key] - sent) * 1000.0 for key, sent in published.items() if key in arrived
        )
    bound = metrics_p99(args.metrics, args.sink) if args.metrics else None
    metrics = f"; /metrics p99 <= {bound:g} ms" if bound is not None else ""
    print(
        f"rate {args.rate:g} pumps {args.pumps} p50 {percentile(latencies, 50):.1f} ms "
        f"p99 {percentile(latencies, 99):.1f} ms max {max(latencies, default=float('nan')):.1f} ms "
        f"({len(latencies)}/{len(published)} alerts{metrics})",
        flush=True,
    )
    if len(latencies) < len(published):
        sys.exit(f"{len(published) - len(latencies)} anomalies raised no anomaly_open command")


if __name__ == "__main__":
    main()
