"""Writes the model of workload (b) of benches/e2e/run.sh: a dense autoencoder of realistic
size, 480-64-16-64-480 (60 steps x 8 features f0..f7, tanh), as model.onnx + model.json.

    .venv/bin/python benches/e2e/make_model.py OUT_DIR

The weights are deterministic (seeded Glorot-uniform), not trained: inference costs the same
whatever the weights, and the benchmark measures throughput only. The graph is built by
training/train.py's own export (DenseModel.nodes, to_onnx: MatMul/Add/Tanh, opset 13) and the
model.json follows its layout, so the engine reads it as it reads a trained model.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "training"))
import train  # noqa: E402

STEPS = 60
FEATURES = [f"f{i}" for i in range(8)]
HIDDEN = (64, 16, 64)


def main() -> int:
    out = sys.argv[1]
    width = STEPS * len(FEATURES)
    rng = np.random.default_rng(17)
    sizes = (width, *HIDDEN, width)
    model = train.DenseModel(hidden=HIDDEN, activation="tanh")
    model.weights, model.biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        model.weights.append(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32))
        model.biases.append(np.zeros(fan_out, dtype=np.float32))
    model.iterations = 0
    proto = train.to_onnx(model, width, name="e2e-ae")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model.onnx"), "wb") as fh:
        fh.write(proto.SerializeToString())
    spec = {
        "name": "e2e-ae",
        "version": "1",
        "family": "dense",
        "features": FEATURES,
        "window": {"length": STEPS, "step": 1},
        # The input's features are about 22 +- 16 (benches/e2e/gen_input.py).
        "scaler": {"mean": [22.5] * len(FEATURES), "std": [16.0] * len(FEATURES)},
        "threshold": {"value": 1.0, "method": "fixed"},
        "detection": {"n": 1, "m": 1, "hysteresis": 1},
        "training": {"data": "untrained: seeded Glorot-uniform weights (benchmark only)"},
        "io": {"input": train.INPUT_NAME, "output": train.OUTPUT_NAME, "shape": [-1, width]},
    }
    with open(os.path.join(out, "model.json"), "w") as fh:
        json.dump(spec, fh, indent=2)
        fh.write("\n")
    params = sum(w.size + b.size for w, b in zip(model.weights, model.biases))
    print(f"e2e-ae: {'-'.join(map(str, sizes))} tanh, {params} parameters, "
          f"{os.path.getsize(os.path.join(out, 'model.onnx'))} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
