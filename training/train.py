#!/usr/bin/env python3
"""Train a tidewatch window-reconstruction model and export it as ONNX + model.json.

The contract (see docs/detection.md) in one paragraph: each reading is normalised per feature,
z = (x - mean) * (1 / std) in float32; W consecutive normalised readings are flattened
step-major into one float32 row of W*F values; the ONNX model maps [batch, W*F] to a
reconstruction of the same shape; the window's score is the mean squared error over its W*F
values; a window "exceeds" when score > threshold; a row's flag is the state of an n-of-m rule
with hysteresis over the exceedances of the windows ending at consecutive rows.

Families (all exported with onnx.helper, float32, opset 13):
  pca       linear autoencoder: x -> (x - mu) V V^T + mu, V = top-k principal directions.
  dense     MLP autoencoder (scikit-learn MLPRegressor X -> X), tanh/relu hidden layers.
  conv      1-D convolutional autoencoder over the window's time axis: a causal-free "same"
            convolution (kernel K over K neighbouring steps, F features -> C channels, tanh), then
            a linear convolution back (C -> F), trained by Adam in numpy; exported as two banded
            MatMuls (the convolutions written out over the W steps), so the graph stays MatMul,
            Add, Tanh.
  forecast  predictive reconstruction: the first W-1 steps are copied, the last step is predicted
            by ridge regression from the W-1 steps before it (a linear VAR). Score = one-step
            forecast error / W.

Usable both as a CLI and as a library (skab_eval.py and test_train.py import it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

SKAB_FEATURES = [
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
]

STD_EPSILON = 1e-12  # a training std below this is replaced by 1.0 (same rule as the engine)
OPSET = 13
IR_VERSION = 8  # readable by onnxruntime >= 1.10 and tract
INPUT_NAME = "input"
OUTPUT_NAME = "output"

FAMILIES = ("pca", "dense", "forecast", "conv")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def lake_filesystem(url: str):
    """(pyarrow filesystem, path) of a lake or registry URL: s3://bucket/prefix (endpoint and
    credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    as tidewatch reads them), file://folder or a folder."""
    import pyarrow.fs as pafs

    if url.startswith("s3://"):
        options = {"region": os.environ.get("AWS_REGION", "us-east-1")}
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            scheme, host = endpoint.split("://", 1) if "://" in endpoint else ("https", endpoint)
            options.update(endpoint_override=host, scheme=scheme)
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            options.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                           secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                           session_token=os.environ.get("AWS_SESSION_TOKEN"))
        return pafs.S3FileSystem(**options), url[len("s3://"):].rstrip("/")
    path = url[len("file://"):] if url.startswith("file://") else url
    return pafs.LocalFileSystem(), os.path.abspath(path)


def read_lake(url: str, start: str | None = None, end: str | None = None,
              devices: list[str] | None = None):
    """Reads a tidewatch lake (Hive-partitioned Parquet, docs/lake.md) into a DataFrame sorted
    by device and event time: readings with `start <= time < end` (ISO 8601, UTC) of
    `devices` (default all). Date partitions outside the range are not read."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    fs, path = lake_filesystem(url)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    condition = None

    def both(a, b):
        return b if a is None else a & b

    names = dataset.schema.names
    for bound, op in ((start, "ge"), (end, "lt")):
        if bound is None:
            continue
        stamp = pa.scalar(_dt.datetime.fromisoformat(bound.replace("Z", "+00:00"))
                          .astimezone(_dt.timezone.utc), type=pa.timestamp("ms", tz="UTC"))
        column = ds.field("time")
        condition = both(condition, column >= stamp if op == "ge" else column < stamp)
        if "date" in names:  # prune whole partitions
            day = ds.field("date").cast(pa.string())
            text = stamp.as_py().strftime("%Y-%m-%d")
            condition = both(condition, day >= text if op == "ge" else day <= text)
    if devices:
        condition = both(condition, ds.field("device").isin(devices))
    table = dataset.to_table(filter=condition)
    return table.to_pandas().sort_values(["device", "time"], kind="stable").reset_index(drop=True)


def publish(out: str, registry: str, name: str, version: str, promote: bool) -> None:
    """Uploads out/model.onnx then out/model.json to <registry>/<name>/<version>/ (the layout
    of `tidewatch model push`) and, with `promote`, points <registry>/<name>/ACTIVE at it."""
    import pyarrow.fs as pafs

    fs, root = lake_filesystem(registry)
    folder = f"{root}/{name}/{version}"
    if isinstance(fs, pafs.LocalFileSystem):  # S3 has no folders (and no marker objects)
        fs.create_dir(folder, recursive=True)
    for file in ("model.onnx", "model.json"):  # model.json last: the version is complete
        with open(os.path.join(out, file), "rb") as source, fs.open_output_stream(f"{folder}/{file}") as sink:
            sink.write(source.read())
    if promote:
        with fs.open_output_stream(f"{root}/{name}/ACTIVE") as sink:
            sink.write(f"{version}\n".encode())


def read_table(path: str, delimiter: str = ";", start: str | None = None,
               end: str | None = None, devices: list[str] | None = None):
    """Reads a CSV (with `delimiter`), a Parquet file or a tidewatch lake (s3://, file:// or a
    folder; `start`, `end` and `devices` select from it) into a pandas DataFrame."""
    import pandas as pd

    if path.startswith("s3://") or path.startswith("file://") or os.path.isdir(path):
        return read_lake(path, start, end, devices)
    if path.endswith(".parquet") or path.endswith(".pq"):
        return pd.read_parquet(path)
    # correctly rounded decimal -> float64 (like Rust's str::parse::<f64>), then f32 on use
    return pd.read_csv(path, sep=delimiter, float_precision="round_trip")


def default_features(df, label_column: str | None) -> list[str]:
    """SKAB's eight sensors when present, else every numeric column but the labels/time."""
    if all(name in df.columns for name in SKAB_FEATURES):
        return list(SKAB_FEATURES)
    skip = {label_column, "changepoint", "datetime", "timestamp", "time",
            # a tidewatch lake's label and partition columns
            "label", "date", "hour", "minute", "year", "month", "day"}
    return [c for c in df.columns if c not in skip and np.issubdtype(df[c].dtype, np.number)]


def as_f32(values) -> np.ndarray:
    """Readings as the engine holds them: float32."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Scaler and windows (the engine-side preprocessing, reproduced bit for bit)
# --------------------------------------------------------------------------------------------

@dataclass
class Scaler:
    mean: np.ndarray  # float64 [F]
    std: np.ndarray  # float64 [F], already "safe" (never below STD_EPSILON)

    @staticmethod
    def fit(x: np.ndarray) -> "Scaler":
        """Population mean/std (ddof=0, like scikit-learn's StandardScaler) in float64 of the
        float32 readings; a std below STD_EPSILON becomes 1.0."""
        x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
        mean = x64.mean(axis=0)
        std = x64.std(axis=0)
        std = np.where(np.abs(std) < STD_EPSILON, 1.0, std)
        return Scaler(mean=mean, std=std)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean as f32, 1/std computed in f64 then cast to f32), exactly as the engine."""
        std = np.where(np.abs(self.std) < STD_EPSILON, 1.0, self.std)
        return self.mean.astype(np.float32), (1.0 / std).astype(np.float32)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """z = (x - mean) * inv_std, all float32."""
        mean32, inv32 = self.factors()
        x32 = np.asarray(x, dtype=np.float32)
        return ((x32 - mean32) * inv32).astype(np.float32)


def make_windows(z: np.ndarray, length: int) -> np.ndarray:
    """All windows of `length` consecutive rows (slide 1), flattened step-major:
    row i holds rows i .. i+length-1 of z, as [z[i,0..F), z[i+1,0..F), ...].
    Returns float32 [n - length + 1, length * F] (empty when n < length)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    n, f = z.shape
    if n < length:
        return np.zeros((0, length * f), dtype=np.float32)
    view = np.lib.stride_tricks.sliding_window_view(z, (length, f))[:, 0]
    return np.ascontiguousarray(view.reshape(n - length + 1, length * f))


def window_scores(x: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Mean squared error over the W*F values of each window: the differences of the float32
    values taken in float64, squared, summed in order and divided by W*F (float64 result)."""
    d = reconstruction.astype(np.float64) - x.astype(np.float64)
    return np.mean(d * d, axis=1)


def feature_errors(x: np.ndarray, reconstruction: np.ndarray, features: int) -> np.ndarray:
    """Per-feature error of each window: mean over the W steps of the squared error of that
    feature ([n, F]); its mean over features equals the window score."""
    d = reconstruction.astype(np.float64) - x.astype(np.float64)
    d = d.reshape(len(d), -1, features)
    return np.mean(d * d, axis=1)


def windows_with_labels(labels: np.ndarray | None, n_rows: int, length: int) -> np.ndarray:
    """Boolean [n_rows - length + 1]: True for windows that contain no labelled row."""
    n_win = max(n_rows - length + 1, 0)
    if labels is None:
        return np.ones(n_win, dtype=bool)
    bad = (np.asarray(labels) == 1).astype(np.int64)
    c = np.concatenate([[0], np.cumsum(bad)])
    per_window = c[length:n_rows + 1] - c[0:n_win]
    return per_window == 0


# --------------------------------------------------------------------------------------------
# Detection: threshold and n-of-m rule
# --------------------------------------------------------------------------------------------

def calibrate_threshold(train_scores: np.ndarray, quantile: float, factor: float) -> float:
    """quantile (numpy's default 'linear' interpolation) of the training window scores x factor."""
    return float(np.quantile(np.asarray(train_scores, dtype=np.float64), quantile) * factor)


POT_MIN_EXCESSES = 10  # fewer excesses over the initial threshold: no tail fit (see pot_threshold)


def pot_threshold(train_scores: np.ndarray, risk: float, initial_quantile: float) -> dict:
    """Peaks over threshold: the score a normal window exceeds with probability `risk`,
    extrapolated from the tail of the training scores.

    The excesses of the scores over their `initial_quantile` quantile t are fitted with a
    generalised Pareto distribution (shape gamma, scale sigma) by the method of moments; the
    threshold is the GPD quantile z = t + sigma/gamma * ((risk * n / n_t)^-gamma - 1), with n
    scores and n_t excesses (z = t - sigma * log(risk * n / n_t) when gamma is 0). A heavy
    tail (gamma > 0) pushes the threshold far out, a light or bounded one keeps it near the
    largest scores. With fewer than POT_MIN_EXCESSES excesses, or excesses that are all equal,
    the largest training score is the threshold. Returns the fit as written to model.json."""
    s = np.sort(np.asarray(train_scores, dtype=np.float64))
    t = float(np.quantile(s, initial_quantile))
    excesses = s[s > t] - t
    out = {"method": "pot", "risk": risk, "initial_quantile": initial_quantile,
           "initial_value": t, "excesses": int(len(excesses)), "windows": int(len(s))}
    mean = float(excesses.mean()) if len(excesses) else 0.0
    var = float(excesses.var()) if len(excesses) else 0.0
    value = None
    if len(excesses) >= POT_MIN_EXCESSES and var > 0 and mean > 0:
        gamma = 0.5 * (1.0 - mean * mean / var)
        sigma = 0.5 * mean * (mean * mean / var + 1.0)
        r = risk * len(s) / len(excesses)
        if abs(gamma) < 1e-9:
            value = t - sigma * np.log(r)
        else:
            value = t + sigma / gamma * (r ** (-gamma) - 1.0)
        out.update(shape=gamma, scale=sigma)
    if value is None or not np.isfinite(value) or value < t:
        value = float(s[-1]) if len(s) else 0.0
        out["fallback"] = "max"  # too few or degenerate excesses: the largest training score
    out["value"] = float(value)
    return out


def calibrate(train_scores: np.ndarray, config: "Config") -> dict:
    """The threshold of `config` from the training scores, with how it was chosen (the
    `threshold` object of model.json)."""
    if config.threshold_method == "pot":
        return pot_threshold(train_scores, config.risk, config.initial_quantile)
    if config.threshold_method == "quantile":
        return {"value": calibrate_threshold(train_scores, config.quantile, config.factor),
                "method": "quantile", "quantile": config.quantile, "factor": config.factor}
    raise ValueError(f"unknown threshold method {config.threshold_method!r}")


def detection_rule(window: int, anomaly_duration: int) -> tuple[int, int, int]:
    """(n, m, hysteresis) from the window length and the expected anomaly duration (rows): an
    alarm opens when the majority of the last m windows exceed, with m half the expected
    duration but at most one window length (a window already smooths over W rows), and closes
    after m quiet windows. Duration 10 and W=10 give 3 of 5, hysteresis 5; durations of 2 or
    less give plain thresholding."""
    m = min(max(1, int(round(anomaly_duration / 2))), max(1, window))
    return (m + 1) // 2, m, m


def residual_weights(errors: np.ndarray) -> np.ndarray:
    """Per-feature error weights from the training windows' per-feature errors [n, F]: a
    feature whose mean training error is above the median feature's is weighted down to the
    median's level (w_f = 1 / max(e_f, median e)), so one noisy feature cannot dominate the
    score; the weights are scaled to average 1."""
    e = np.asarray(errors, dtype=np.float64).mean(axis=0)
    floor = max(float(np.median(e)), 1e-12)
    w = 1.0 / np.maximum(e, floor)
    return w * len(w) / w.sum()


def n_of_m(exceed: np.ndarray, n: int, m: int, hysteresis: int) -> np.ndarray:
    """The engine's alarm state machine over consecutive windows.

    For window k (in stream order): count = exceedances among windows k-m+1..k (windows before
    the first one count as non-exceeding); closed -> open when count >= n; open -> closed when
    the last `hysteresis` windows all did not exceed. One transition per window at most.
    Returns int8 states (the flag of the row the window ends at)."""
    e = np.asarray(exceed, dtype=bool)
    out = np.zeros(len(e), dtype=np.int8)
    count = 0
    quiet = 0
    state = 0
    for k in range(len(e)):
        if e[k]:
            count += 1
            quiet = 0
        else:
            quiet += 1
        if k - m >= 0 and e[k - m]:
            count -= 1
        if state == 0:
            if count >= n:
                state = 1
        elif quiet >= hysteresis:
            state = 0
        out[k] = state
    return out


def row_flags(scores: np.ndarray, threshold: float, n_rows: int, length: int,
              n: int, m: int, hysteresis: int) -> np.ndarray:
    """Flags of all n_rows rows of a stream from the scores of its windows (window k ends at row
    k + length - 1); rows before the first full window are 0."""
    flags = np.zeros(n_rows, dtype=np.int8)
    if len(scores):
        flags[length - 1:] = n_of_m(np.asarray(scores) > threshold, n, m, hysteresis)
    return flags


# --------------------------------------------------------------------------------------------
# Model families: each has fit(X), reconstruct(X) (numpy, float32 math like the graph) and
# graph() -> onnx.GraphProto pieces.
# --------------------------------------------------------------------------------------------

def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


class PcaModel:
    """Linear autoencoder: x_hat = ((x - mu) @ V) @ V^T + mu with V [D, k] orthonormal."""

    family = "pca"

    def __init__(self, components: float = 0.8, **_):
        # components: int >= 1 -> that many; float in (0, 1) -> smallest k explaining it
        self.components = components

    def fit(self, x: np.ndarray, seed: int = 0) -> "PcaModel":
        x64 = x.astype(np.float64)
        mu = x64.mean(axis=0)
        xc = x64 - mu
        # SVD of the centred data; signs fixed so the result is deterministic
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        var = s ** 2
        if self.components >= 1:
            k = int(self.components)
        else:
            ratio = np.cumsum(var) / max(var.sum(), 1e-300)
            k = int(np.searchsorted(ratio, self.components) + 1)
        k = max(1, min(k, vt.shape[0]))
        v = vt[:k].T  # [D, k]
        signs = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(k)])
        signs[signs == 0] = 1
        v = v * signs
        self.k = k
        self.mu = _f32(mu)
        self.v = _f32(v)
        self.vt = _f32(v.T)
        return self

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        h = (x.astype(np.float32) - self.mu) @ self.v
        return (h @ self.vt + self.mu).astype(np.float32)

    def params(self) -> dict:
        return {"components": self.components, "k": self.k}

    def nodes(self, helper, numpy_helper):
        inits = [numpy_helper.from_array(self.mu, "mu"), numpy_helper.from_array(self.v, "V"),
                 numpy_helper.from_array(self.vt, "Vt")]
        nodes = [
            helper.make_node("Sub", [INPUT_NAME, "mu"], ["centred"]),
            helper.make_node("MatMul", ["centred", "V"], ["code"]),
            helper.make_node("MatMul", ["code", "Vt"], ["decoded"]),
            helper.make_node("Add", ["decoded", "mu"], [OUTPUT_NAME]),
        ]
        return nodes, inits


class DenseModel:
    """MLP autoencoder X -> X trained with scikit-learn's MLPRegressor (Adam, squared loss).
    Graph: (MatMul, Add, act)* then MatMul, Add (identity output)."""

    family = "dense"

    def __init__(self, hidden: tuple[int, ...] = (32, 8, 32), activation: str = "tanh",
                 alpha: float = 1e-4, max_iter: int = 500, learning_rate: float = 1e-3, **_):
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.alpha = alpha
        self.max_iter = max_iter
        self.learning_rate = learning_rate

    def fit(self, x: np.ndarray, seed: int = 0) -> "DenseModel":
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor

        mlp = MLPRegressor(hidden_layer_sizes=self.hidden, activation=self.activation,
                           solver="adam", alpha=self.alpha, batch_size=min(64, len(x)),
                           learning_rate_init=self.learning_rate, max_iter=self.max_iter,
                           shuffle=True, random_state=seed, tol=1e-6, n_iter_no_change=20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp.fit(x.astype(np.float64), x.astype(np.float64))
        self.weights = [_f32(w) for w in mlp.coefs_]
        self.biases = [_f32(b) for b in mlp.intercepts_]
        self.iterations = int(mlp.n_iter_)
        return self

    def _act(self, h):
        if self.activation == "tanh":
            return np.tanh(h)
        if self.activation == "relu":
            return np.maximum(h, 0)
        if self.activation == "identity":
            return h
        raise ValueError(self.activation)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = (h @ w + b).astype(np.float32)
            if i < last:
                h = self._act(h).astype(np.float32)
        return h

    def params(self) -> dict:
        return {"hidden": list(self.hidden), "activation": self.activation, "alpha": self.alpha,
                "iterations": self.iterations}

    def nodes(self, helper, numpy_helper):
        nodes, inits = [], []
        prev = INPUT_NAME
        last = len(self.weights) - 1
        act = {"tanh": "Tanh", "relu": "Relu", "identity": "Identity"}[self.activation]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"]))
            out = OUTPUT_NAME if i == last else f"lin{i}"
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
            if i < last:
                nodes.append(helper.make_node(act, [out], [f"h{i}"]))
                prev = f"h{i}"
        return nodes, inits


class ForecastModel:
    """Predictive reconstruction. With D = W*F and P = (W-1)*F: output[:, :P] = input[:, :P]
    and output[:, P:] = input[:, :P] @ A + c, a ridge regression of the last step on the W-1
    steps before it. Exported as a single MatMul by [I_P | A] (zeros for the last block) + Add."""

    family = "forecast"

    def __init__(self, ridge: float = 1.0, features: int = 0, **_):
        self.ridge = ridge
        self.features = features

    def fit(self, x: np.ndarray, seed: int = 0) -> "ForecastModel":
        f = self.features
        d = x.shape[1]
        p = d - f
        if p <= 0:
            raise ValueError("the forecast family needs a window of at least 2 steps")
        x64 = x.astype(np.float64)
        past, last = x64[:, :p], x64[:, p:]
        pm, lm = past.mean(axis=0), last.mean(axis=0)
        pc, lc = past - pm, last - lm
        gram = pc.T @ pc + self.ridge * len(x64) * np.eye(p) / max(p, 1)
        a = np.linalg.solve(gram, pc.T @ lc)  # [p, f]
        c = lm - pm @ a
        full = np.zeros((d, d), dtype=np.float64)
        full[:p, :p] = np.eye(p)
        full[:p, p:] = a
        bias = np.zeros(d, dtype=np.float64)
        bias[p:] = c
        self.matrix = _f32(full)
        self.bias = _f32(bias)
        return self

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) @ self.matrix + self.bias).astype(np.float32)

    def params(self) -> dict:
        return {"ridge": self.ridge}

    def nodes(self, helper, numpy_helper):
        inits = [numpy_helper.from_array(self.matrix, "M"), numpy_helper.from_array(self.bias, "c")]
        nodes = [helper.make_node("MatMul", [INPUT_NAME, "M"], ["mm"]),
                 helper.make_node("Add", ["mm", "c"], [OUTPUT_NAME])]
        return nodes, inits


def _unfold(x: np.ndarray, kernel: int) -> np.ndarray:
    """[B, W, C] -> [B, W, K*C]: for each step the K steps around it ("same" zero padding,
    K // 2 before), offset-major."""
    before = kernel // 2
    padded = np.pad(x, ((0, 0), (before, kernel - 1 - before), (0, 0)))
    steps = x.shape[1]
    return np.concatenate([padded[:, o:o + steps] for o in range(kernel)], axis=2)


def _fold(du: np.ndarray, kernel: int, channels: int) -> np.ndarray:
    """The adjoint of _unfold: [B, W, K*C] -> [B, W, C]."""
    before = kernel // 2
    batch, steps, _ = du.shape
    padded = np.zeros((batch, steps + kernel - 1, channels), dtype=du.dtype)
    for o in range(kernel):
        padded[:, o:o + steps] += du[:, :, o * channels:(o + 1) * channels]
    return padded[:, before:before + steps]


def _banded(weights: np.ndarray, kernel: int, steps: int, inputs: int, outputs: int) -> np.ndarray:
    """A "same" convolution over `steps` steps as one matrix [steps*inputs, steps*outputs] on the
    step-major flattened window: output step t reads input steps t + o - K // 2."""
    before = kernel // 2
    full = np.zeros((steps * inputs, steps * outputs), dtype=np.float64)
    for t in range(steps):
        for o in range(kernel):
            s = t + o - before
            if 0 <= s < steps:
                full[s * inputs:(s + 1) * inputs, t * outputs:(t + 1) * outputs] = \
                    weights[o * inputs:(o + 1) * inputs]
    return full


class ConvModel:
    """1-D convolutional autoencoder over the window's steps: h = tanh(conv_K(x; F -> C)),
    x_hat = conv_K(h; C -> F) (linear), "same" padding, so each step is rebuilt from C
    channels that see the K steps around it. Trained by minibatch Adam on the mean squared
    error (plus `alpha` L2) in numpy; the graph is MatMul(E) + b, Tanh, MatMul(D) + c with E and
    D the convolutions written out as banded matrices over the W steps."""

    family = "conv"

    def __init__(self, channels: int = 0, kernel: int = 3, epochs: int = 30,
                 learning_rate: float = 3e-3, alpha: float = 1e-4, batch: int = 64,
                 features: int = 0, window: int = 0, **_):
        self.channels = int(channels)
        self.kernel = int(kernel)
        self.epochs = int(epochs)
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.batch = int(batch)
        self.features = int(features)
        self.window = int(window)

    def _width(self) -> int:
        # default: a quarter of the features (at least 2 channels)
        return self.channels if self.channels > 0 else max(2, self.features // 4)

    @staticmethod
    def loss_and_grads(params: dict, x: np.ndarray, kernel: int, alpha: float):
        """Mean squared reconstruction error (+ alpha/2 * |W|^2) of windows x [B, W, F] and its
        gradients with respect to params (we, be, wd, bd)."""
        we, be, wd, bd = params["we"], params["be"], params["wd"], params["bd"]
        c = be.shape[0]
        u = _unfold(x, kernel)
        h = np.tanh(u @ we + be)
        v = _unfold(h, kernel)
        y = v @ wd + bd
        diff = y - x
        loss = float(np.mean(diff * diff)) + 0.5 * alpha * float((we * we).sum() + (wd * wd).sum())
        dy = 2.0 * diff / diff.size
        grads = {"wd": np.einsum("bwk,bwf->kf", v, dy) + alpha * wd, "bd": dy.sum(axis=(0, 1))}
        dh = _fold(dy @ wd.T, kernel, c)
        da = dh * (1.0 - h * h)
        grads["we"] = np.einsum("bwk,bwc->kc", u, da) + alpha * we
        grads["be"] = da.sum(axis=(0, 1))
        return loss, grads

    def fit(self, x: np.ndarray, seed: int = 0) -> "ConvModel":
        f, k = self.features, self.kernel
        if f <= 0 or x.shape[1] % f:
            raise ValueError("the conv family needs the feature count")
        w = x.shape[1] // f
        self.window = w
        c = self._width()
        rng = np.random.default_rng(seed)
        params = {"we": rng.normal(0, 1 / np.sqrt(k * f), (k * f, c)), "be": np.zeros(c),
                  "wd": rng.normal(0, 1 / np.sqrt(k * c), (k * c, f)), "bd": np.zeros(f)}
        moments = {name: (np.zeros_like(p), np.zeros_like(p)) for name, p in params.items()}
        data = x.astype(np.float64).reshape(len(x), w, f)
        step, (b1, b2) = 0, (0.9, 0.999)
        self.losses = []
        for _ in range(self.epochs):
            order = rng.permutation(len(data))
            total = 0.0
            for start in range(0, len(data), self.batch):
                batch = data[order[start:start + self.batch]]
                loss, grads = self.loss_and_grads(params, batch, k, self.alpha)
                total += loss * len(batch)
                step += 1
                for name, g in grads.items():
                    m1, m2 = moments[name]
                    m1 *= b1
                    m1 += (1 - b1) * g
                    m2 *= b2
                    m2 += (1 - b2) * g * g
                    corrected = m1 / (1 - b1 ** step) / (np.sqrt(m2 / (1 - b2 ** step)) + 1e-8)
                    params[name] -= self.learning_rate * corrected
            self.losses.append(total / len(data))
        self.params_ = params
        self.encoder = _f32(_banded(params["we"], k, w, f, c))
        self.encoder_bias = _f32(np.tile(params["be"], w))
        self.decoder = _f32(_banded(params["wd"], k, w, c, f))
        self.decoder_bias = _f32(np.tile(params["bd"], w))
        return self

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        h = np.tanh((x.astype(np.float32) @ self.encoder + self.encoder_bias).astype(np.float32))
        return (h.astype(np.float32) @ self.decoder + self.decoder_bias).astype(np.float32)

    def params(self) -> dict:
        return {"channels": self._width(), "kernel": self.kernel, "epochs": self.epochs,
                "learning_rate": self.learning_rate, "alpha": self.alpha,
                "final_loss": float(self.losses[-1]) if self.losses else None}

    def nodes(self, helper, numpy_helper):
        inits = [numpy_helper.from_array(self.encoder, "E"),
                 numpy_helper.from_array(self.encoder_bias, "be"),
                 numpy_helper.from_array(self.decoder, "D"),
                 numpy_helper.from_array(self.decoder_bias, "bd")]
        nodes = [helper.make_node("MatMul", [INPUT_NAME, "E"], ["conv1"]),
                 helper.make_node("Add", ["conv1", "be"], ["pre"]),
                 helper.make_node("Tanh", ["pre"], ["hidden"]),
                 helper.make_node("MatMul", ["hidden", "D"], ["conv2"]),
                 helper.make_node("Add", ["conv2", "bd"], [OUTPUT_NAME])]
        return nodes, inits


class WeightedModel:
    """Per-feature error weights folded into a fitted model: the scaler's z is multiplied by
    s = sqrt(w) (scaler std / s), the graph divides its input by s, runs the model and
    multiplies the reconstruction by s, so the engine's plain mean squared error becomes
    sum_f w_f * err_f / F. The engine needs nothing new."""

    def __init__(self, inner, weights: np.ndarray, window: int):
        self.inner = inner
        self.family = inner.family
        self.weights = np.asarray(weights, dtype=np.float64)
        s = np.sqrt(self.weights)
        self.scale = _f32(np.tile(s, window))
        self.inv_scale = _f32(np.tile(1.0 / s, window))

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        u = (x.astype(np.float32) * self.inv_scale).astype(np.float32)
        return (self.inner.reconstruct(u) * self.scale).astype(np.float32)

    def params(self) -> dict:
        return self.inner.params()

    def nodes(self, helper, numpy_helper):
        inner_nodes, inits = self.inner.nodes(helper, numpy_helper)
        for node in inner_nodes:
            for i, name in enumerate(node.input):
                if name == INPUT_NAME:
                    node.input[i] = "unweighted"
            for i, name in enumerate(node.output):
                if name == OUTPUT_NAME:
                    node.output[i] = "reconstructed"
        inits += [numpy_helper.from_array(self.inv_scale, "inv_error_scale"),
                  numpy_helper.from_array(self.scale, "error_scale")]
        nodes = ([helper.make_node("Mul", [INPUT_NAME, "inv_error_scale"], ["unweighted"])]
                 + inner_nodes
                 + [helper.make_node("Mul", ["reconstructed", "error_scale"], [OUTPUT_NAME])])
        return nodes, inits


def make_model(family: str, features: int, **hyper):
    if family == "pca":
        return PcaModel(**hyper)
    if family == "dense":
        return DenseModel(**hyper)
    if family == "forecast":
        return ForecastModel(features=features, **hyper)
    if family == "conv":
        return ConvModel(features=features, **hyper)
    raise ValueError(f"unknown family {family!r} (choose from {', '.join(FAMILIES)})")


def to_onnx(model, width: int, name: str = "tidewatch"):
    """The model as an onnx.ModelProto: float32 input [batch, width] -> output [batch, width]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = model.nodes(helper, numpy_helper)
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    proto = helper.make_model(graph, producer_name="tidewatch-train",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def ort_session(proto):
    """An onnxruntime session on one thread (deterministic, friendly to a shared machine)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    data = proto if isinstance(proto, (bytes, bytearray)) else proto.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def ort_reconstruct(session, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    if len(x) == 0:
        return np.zeros_like(x, dtype=np.float32)
    outs = [session.run([OUTPUT_NAME], {INPUT_NAME: _f32(x[i:i + batch])})[0]
            for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=0)


# --------------------------------------------------------------------------------------------
# Training end to end
# --------------------------------------------------------------------------------------------

@dataclass
class Config:
    family: str = "pca"
    window: int = 10
    # threshold: "pot" (peaks over threshold on the training scores' tail, with risk and
    # initial_quantile) or "quantile" (quantile x factor)
    threshold_method: str = "pot"
    risk: float = 1e-4
    initial_quantile: float = 0.95
    quantile: float = 0.995
    factor: float = 1.5
    # per-feature error weights: "none" or "residual" (residual_weights)
    error_weights: str = "none"
    # the n-of-m rule: derived from window and anomaly_duration (rows) unless given
    anomaly_duration: int = 10
    n: int | None = None
    m: int | None = None
    hysteresis: int | None = None
    seed: int = 0
    hyper: dict = field(default_factory=dict)

    def rule(self) -> tuple[int, int, int]:
        """(n, m, hysteresis): the given ones, the others from detection_rule."""
        n, m, h = detection_rule(self.window, self.anomaly_duration)
        return (n if self.n is None else self.n, m if self.m is None else self.m,
                h if self.hysteresis is None else self.hysteresis)


@dataclass
class Trained:
    config: Config
    features: list[str]
    scaler: Scaler
    model: object
    proto: object
    session: object
    threshold: float
    train_scores: np.ndarray
    rows: int
    windows: int
    calibration: dict = field(default_factory=dict)  # model.json's `threshold`
    weights: np.ndarray | None = None  # per-feature error weights (None: all 1)


def fit(raw: np.ndarray, features: list[str], config: Config,
        labels: np.ndarray | None = None) -> Trained:
    """Fits scaler, model and threshold on the training rows `raw` [rows, F] (float).
    Windows containing a labelled row (labels == 1) are left out, and so are those rows from
    the scaler. The threshold is calibrated on onnxruntime scores of the training windows."""
    x32 = as_f32(raw)
    keep_rows = np.ones(len(x32), dtype=bool) if labels is None else (np.asarray(labels) != 1)
    if keep_rows.sum() < 2:
        raise ValueError("fewer than 2 unlabelled training rows")
    scaler = Scaler.fit(x32[keep_rows])
    z = scaler.transform(x32)
    xw = make_windows(z, config.window)[windows_with_labels(labels, len(z), config.window)]
    if len(xw) < 2:
        raise ValueError(f"fewer than 2 training windows of length {config.window}")
    model = make_model(config.family, len(features), **config.hyper).fit(xw, seed=config.seed)
    weights = None
    if config.error_weights == "residual":
        weights = residual_weights(feature_errors(xw, model.reconstruct(xw), len(features)))
        scaler = Scaler(mean=scaler.mean, std=scaler.std / np.sqrt(weights))
        model = WeightedModel(model, weights, config.window)
        xw = make_windows(scaler.transform(x32), config.window)[
            windows_with_labels(labels, len(z), config.window)]
    elif config.error_weights != "none":
        raise ValueError(f"unknown error weights {config.error_weights!r}")
    proto = to_onnx(model, xw.shape[1])
    session = ort_session(proto)
    scores = window_scores(xw, ort_reconstruct(session, xw))
    calibration = calibrate(scores, config)
    return Trained(config, list(features), scaler, model, proto, session,
                   calibration["value"], scores, int(keep_rows.sum()), int(len(xw)),
                   calibration, weights)


def stream_scores(trained: Trained, raw: np.ndarray) -> np.ndarray:
    """Scores (onnxruntime) of every full window of a stream of raw readings, in order."""
    z = trained.scaler.transform(as_f32(raw))
    xw = make_windows(z, trained.config.window)
    return window_scores(xw, ort_reconstruct(trained.session, xw))


def model_json(trained: Trained, name: str, version: str, data: str) -> dict:
    c = trained.config
    width = c.window * len(trained.features)
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return {
        "name": name,
        "version": version,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "family": c.family,
        "features": trained.features,
        "window": {"length": c.window, "step": 1},
        "scaler": {"mean": [float(v) for v in trained.scaler.mean],
                   "std": [float(v) for v in trained.scaler.std]},
        "threshold": trained.calibration,
        "detection": dict(zip(("n", "m", "hysteresis"), c.rule()),
                          anomaly_duration=c.anomaly_duration,
                          rule="derived" if (c.n, c.m, c.hysteresis) == (None, None, None)
                          else "given"),
        "error_weights": ({"method": "none"} if trained.weights is None else
                          {"method": c.error_weights,
                           "weights": [float(v) for v in trained.weights]}),
        "training": {"data": data, "rows": trained.rows, "windows": trained.windows,
                     "seed": c.seed, "hyperparameters": trained.model.params()},
        "io": {"input": INPUT_NAME, "output": OUTPUT_NAME, "shape": [-1, width]},
    }


def save(trained: Trained, out_dir: str, name: str, version: str, data: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.onnx"), "wb") as fh:
        fh.write(trained.proto.SerializeToString())
    spec = model_json(trained, name, version, data)
    with open(os.path.join(out_dir, "model.json"), "w") as fh:
        json.dump(spec, fh, indent=2)
        fh.write("\n")
    return spec


def verify(trained: Trained, x: np.ndarray) -> float:
    """Max |numpy score - onnxruntime score| over windows x (float32 [n, W*F])."""
    a = window_scores(x, trained.model.reconstruct(x))
    b = window_scores(x, ort_reconstruct(trained.session, x))
    return float(np.max(np.abs(a - b))) if len(x) else 0.0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_hidden(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v)


def hyper_from_args(args) -> dict:
    if args.family == "pca":
        return {"components": args.components}
    if args.family == "dense":
        return {"hidden": parse_hidden(args.hidden), "activation": args.activation,
                "alpha": args.alpha, "max_iter": args.max_iter}
    if args.family == "forecast":
        return {"ridge": args.ridge}
    if args.family == "conv":
        return {"channels": args.channels, "kernel": args.kernel, "epochs": args.epochs,
                "learning_rate": args.learning_rate, "alpha": args.alpha}
    return {}


def add_model_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    # the chosen configuration (docs/detection.md)
    d = {"family": "pca", "window": 10, "threshold_method": "pot", "risk": 1e-4,
         "initial_quantile": 0.95, "quantile": 0.995, "factor": 1.5, "error_weights": "none",
         "anomaly_duration": 10, "n": None, "m": None, "hysteresis": None, "components": 0.8}
    d.update(defaults or {})
    p.add_argument("--family", choices=FAMILIES, default=d["family"])
    p.add_argument("--window", type=int, default=d["window"], help="window length W (steps)")
    p.add_argument("--threshold-method", choices=("pot", "quantile"), default=None,
                   help="pot: peaks over threshold on the tail of the training scores (--risk, "
                        "--initial-quantile); quantile: --quantile x --factor (default: "
                        f"quantile when --quantile or --factor is given, else {d['threshold_method']})")
    p.add_argument("--risk", type=float, default=d["risk"],
                   help="pot: probability that a normal window exceeds the threshold")
    p.add_argument("--initial-quantile", type=float, default=d["initial_quantile"],
                   help="pot: the tail fitted is the scores above this quantile")
    p.add_argument("--quantile", type=float, default=None,
                   help=f"quantile method: quantile of the training window scores ({d['quantile']})")
    p.add_argument("--factor", type=float, default=None,
                   help=f"quantile method: threshold = quantile x factor ({d['factor']})")
    p.set_defaults(default_threshold_method=d["threshold_method"], default_quantile=d["quantile"],
                   default_factor=d["factor"])
    p.add_argument("--error-weights", choices=("none", "residual"), default=d["error_weights"],
                   help="per-feature error normalisation: residual weighs features noisier than "
                        "the median feature down to its level")
    p.add_argument("--anomaly-duration", type=int, default=d["anomaly_duration"],
                   help="expected anomaly duration in rows: sets n, m and hysteresis")
    p.add_argument("--n", type=int, default=d["n"],
                   help="exceedances needed to open an anomaly (default: from --anomaly-duration)")
    p.add_argument("--m", type=int, default=d["m"], help="... among the last m windows")
    p.add_argument("--hysteresis", type=int, default=d["hysteresis"],
                   help="consecutive non-exceeding windows that close an anomaly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", type=float, default=d["components"],
                   help="pca: components (>= 1) or explained-variance fraction (< 1)")
    p.add_argument("--hidden", default="32,8,32", help="dense: hidden layer sizes, e.g. 32,8,32")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu"), help="dense")
    p.add_argument("--alpha", type=float, default=1e-4, help="dense, conv: L2 penalty")
    p.add_argument("--max-iter", type=int, default=500, help="dense: epochs at most")
    p.add_argument("--ridge", type=float, default=1.0, help="forecast: ridge strength")
    p.add_argument("--channels", type=int, default=0,
                   help="conv: channels of the hidden layer (default: features / 4, at least 2)")
    p.add_argument("--kernel", type=int, default=3, help="conv: kernel size (steps)")
    p.add_argument("--epochs", type=int, default=30, help="conv: training epochs")
    p.add_argument("--learning-rate", type=float, default=3e-3, help="conv: Adam step size")


def config_from_args(args) -> Config:
    method = args.threshold_method
    if method is None:  # --quantile / --factor alone keep their old meaning
        quantile_given = args.quantile is not None or args.factor is not None
        method = "quantile" if quantile_given else args.default_threshold_method
    return Config(family=args.family, window=args.window,
                  threshold_method=method, risk=args.risk,
                  initial_quantile=args.initial_quantile,
                  quantile=args.default_quantile if args.quantile is None else args.quantile,
                  factor=args.default_factor if args.factor is None else args.factor,
                  error_weights=args.error_weights,
                  anomaly_duration=args.anomaly_duration, n=args.n, m=args.m,
                  hysteresis=args.hysteresis, seed=args.seed, hyper=hyper_from_args(args))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="training data: .csv, .parquet, or a tidewatch lake (s3://bucket/prefix,"
                        " file://folder or a folder)")
    p.add_argument("--start", default=None, help="lake: first event time (ISO 8601, UTC)")
    p.add_argument("--end", default=None, help="lake: end of the event times (exclusive)")
    p.add_argument("--device", action="append", default=None, help="lake: only this device (repeatable)")
    p.add_argument("--registry", default=None,
                   help="publish the model to this registry (s3://bucket/prefix or a folder)")
    p.add_argument("--promote", action="store_true", help="with --registry: make it the active version")
    p.add_argument("--out", required=True, help="output directory (model.onnx, model.json)")
    p.add_argument("--train-rows", type=int, default=None,
                   help="use only the first N rows (default: all)")
    p.add_argument("--features", nargs="+", default=None,
                   help="feature columns in order (default: SKAB's eight sensors)")
    p.add_argument("--delimiter", default=";", help="CSV delimiter")
    p.add_argument("--label-column", default="anomaly",
                   help="rows with label 1 are left out of training when the column exists")
    p.add_argument("--name", default=None, help="model name (default: the output folder name)")
    p.add_argument("--version", default=None, help="version text (default: UTC timestamp)")
    add_model_args(p)
    args = p.parse_args(argv)

    df = read_table(args.data, args.delimiter, args.start, args.end, args.device)
    if args.train_rows is not None:
        df = df.iloc[: args.train_rows]
    features = args.features or default_features(df, args.label_column)
    missing = [f for f in features if f not in df.columns]
    if missing:
        p.error(f"columns not in {args.data}: {missing}")
    if args.label_column not in df.columns and "label" in df.columns and "time" in df.columns:
        args.label_column = "label"  # a tidewatch lake
    labels = df[args.label_column].to_numpy() if args.label_column in df.columns else None
    config = config_from_args(args)
    trained = fit(df[features].to_numpy(dtype=np.float64), features, config, labels)

    name = args.name or os.path.basename(os.path.normpath(args.out))
    version = args.version or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    spec = save(trained, args.out, name, version, args.data)

    z = trained.scaler.transform(as_f32(df[features].to_numpy(dtype=np.float64)))
    diff = verify(trained, make_windows(z, config.window))
    size = os.path.getsize(os.path.join(args.out, "model.onnx"))
    print(f"{name}: family={config.family} W={config.window} features={len(features)} "
          f"rows={trained.rows} windows={trained.windows} threshold={trained.threshold:.6g} "
          f"onnx={size} bytes max|numpy-ort|={diff:.2e}", file=sys.stderr)
    if diff >= 1e-5:
        print("error: onnxruntime does not reproduce the numpy scores", file=sys.stderr)
        return 1
    if args.registry:
        publish(args.out, args.registry, name, version, args.promote)
    json.dump({"out": args.out, "threshold": spec["threshold"], "training": spec["training"]},
              sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
