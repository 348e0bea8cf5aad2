"""The limit of workload (b) of benches/e2e/run.sh: raw batched ONNX Runtime on one thread.

    .venv/bin/python benches/e2e/ort_limit.py MODEL_DIR WINDOWS [BATCH]

Runs WINDOWS rows (60 steps x 8 features, standard normal, seeded) through the model in
batches of BATCH rows (default 1024, the autoencoder's `max_batch_rows`), with one intra-op
and one inter-op thread, the same settings as the engine's session; only the runs are timed
(after one warm-up batch). Prints one line:
`onnxruntime windows N seconds S windows_per_sec W readings_per_sec R` where R = W x 10 (a
window per 10 readings in the workload: the rate the model alone would allow).
"""

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

SLIDE = 10


def main() -> int:
    folder, windows = sys.argv[1], int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    with open(os.path.join(folder, "model.json")) as fh:
        spec = json.load(fh)
    width = spec["window"]["length"] * len(spec["features"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    name = spec["io"]["input"]
    data = np.random.default_rng(17).standard_normal((batch, width), dtype=np.float32)
    session.run(None, {name: data})
    done, started = 0, time.perf_counter()
    while done < windows:
        rows = min(batch, windows - done)
        session.run(None, {name: data[:rows]})
        done += rows
    seconds = time.perf_counter() - started
    rate = done / seconds
    print(f"onnxruntime windows {done} seconds {seconds:.3f} windows_per_sec {rate:.0f} "
          f"readings_per_sec {rate * SLIDE:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
