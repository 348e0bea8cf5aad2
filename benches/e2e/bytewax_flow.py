"""Workload (a) of benches/e2e/run.sh in Bytewax: JSON lines -> parse and normalise -> per-device
count window of 60 readings every 10 -> mean, std, min and max per feature -> count.

    .venv-bytewax/bin/python benches/e2e/bytewax_flow.py FILE LINES

Runs on one worker (`bytewax.testing.run_main`: the dataflow on the calling thread). Prints one
line: `bytewax readings N windows W seconds S readings_per_sec R checksum C`, N being LINES
(the readings are not counted one by one: an `inspect` step per reading would cost Bytewax a
call into Python per item that the other sides do not pay).
"""

import json
import math
import sys
import time
from collections import deque

import bytewax.operators as op
from bytewax.connectors.files import FileSource
from bytewax.dataflow import Dataflow
from bytewax.testing import run_main

FEATURES = [f"f{i}" for i in range(8)]
SIZE = 60
SLIDE = 10


def normalize(line):
    obj = json.loads(line)
    return str(obj["device"]), (int(obj["ts"]), [float(obj[f]) for f in FEATURES])


def stats(rows):
    out = []
    for column in zip(*rows):
        mean = sum(column) / SIZE
        std = math.sqrt(sum((x - mean) ** 2 for x in column) / SIZE)
        out.extend((mean, std, min(column), max(column)))
    return out


def window(state, reading):
    if state is None:
        state = [deque(maxlen=SIZE), 0]
    state[0].append(reading[1])
    state[1] += 1
    if state[1] >= SIZE and state[1] % SLIDE == 0:
        return state, [stats(state[0])]
    return state, []


def main() -> int:
    path, lines = sys.argv[1], int(sys.argv[2])
    counts = {"windows": 0, "checksum": 0.0}

    def count_window(_step, item):
        counts["windows"] += 1
        counts["checksum"] += sum(item[1])

    flow = Dataflow("e2e_a")
    raw = op.input("in", flow, FileSource(path))
    readings = op.map("normalize", raw, normalize)
    keyed = op.key_on("by_device", readings, lambda r: r[0])
    values = op.map_value("values", keyed, lambda r: r[1])
    windows = op.stateful_flat_map("window", values, window)
    op.inspect("count_windows", windows, count_window)
    started = time.perf_counter()
    run_main(flow)
    seconds = time.perf_counter() - started
    print(f"bytewax readings {lines} windows {counts['windows']} "
          f"seconds {seconds:.3f} readings_per_sec {lines / seconds:.0f} "
          f"checksum {counts['checksum']:.6e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
