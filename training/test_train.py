"""Tests of the trainer and of the evaluation's building blocks on small synthetic data.

Run: .venv/bin/python -m pytest training/test_train.py -q
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import skab_eval as E  # noqa: E402
import train as T  # noqa: E402

FEATURES = ["a", "b", "flat", "c"]


def synthetic_csv(path, rows=260, labelled=range(200, 215), delimiter=";"):
    rng = np.random.default_rng(7)
    t = np.arange(rows)
    a = np.sin(t / 7.0) + 0.05 * rng.standard_normal(rows)
    b = 0.5 * a + 0.1 * rng.standard_normal(rows) + 3.0
    flat = np.full(rows, 2.5)  # constant: std 0 -> 1
    c = 100.0 + 2.0 * rng.standard_normal(rows)
    label = np.zeros(rows, dtype=int)
    label[list(labelled)] = 1
    start = dt.datetime(2020, 3, 9, 10, 0, 0)
    with open(path, "w") as fh:
        fh.write(delimiter.join(["datetime"] + FEATURES + ["anomaly"]) + "\n")
        for i in range(rows):
            ts = (start + dt.timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S")
            vals = [f"{v:.6f}" for v in (a[i], b[i], flat[i], c[i])]
            fh.write(delimiter.join([ts] + vals + [str(label[i])]) + "\n")
    return np.stack([a, b, flat, c], axis=1), label


FAMILY_ARGS = {
    "pca": ["--components", "0.9"],
    "dense": ["--hidden", "6", "--max-iter", "40"],
    "forecast": ["--ridge", "1.0"],
    "conv": ["--channels", "2", "--kernel", "3", "--epochs", "3"],
}


@pytest.mark.parametrize("family", sorted(FAMILY_ARGS))
def test_train_export_reload(tmp_path, family):
    import onnx
    import onnxruntime as ort

    data = tmp_path / "train.csv"
    _, label = synthetic_csv(data)
    raw = T.read_table(str(data))[FEATURES].to_numpy(dtype=np.float64)  # as written (6 decimals)
    out = tmp_path / "model"
    w = 6
    rc = T.main(["--data", str(data), "--out", str(out), "--family", family, "--window", str(w),
                 "--features", *FEATURES, "--threshold-method", "quantile",
                 "--quantile", "0.98", "--factor", "1.2",
                 "--n", "2", "--m", "3", "--hysteresis", "4", "--seed", "3",
                 *FAMILY_ARGS[family]])
    assert rc == 0

    spec = json.loads((out / "model.json").read_text())
    assert spec["name"] == "model"
    assert isinstance(spec["version"], str) and spec["version"]
    dt.datetime.fromisoformat(spec["created_at"].replace("Z", "+00:00"))
    assert spec["family"] == family
    assert spec["features"] == FEATURES
    assert spec["window"] == {"length": w, "step": 1}
    keep = label != 1
    assert spec["training"]["data"] == str(data)
    assert spec["training"]["rows"] == int(keep.sum())
    # windows containing a labelled row are left out
    n_rows = len(raw)
    assert spec["training"]["windows"] == int(T.windows_with_labels(label, n_rows, w).sum())
    assert len(spec["scaler"]["mean"]) == len(spec["scaler"]["std"]) == len(FEATURES)
    assert spec["scaler"]["std"][2] == 1.0  # constant feature
    x32 = raw.astype(np.float32)[keep].astype(np.float64)
    np.testing.assert_allclose(spec["scaler"]["mean"], x32.mean(axis=0), rtol=1e-12)
    thr = spec["threshold"]
    assert thr["method"] == "quantile" and thr["quantile"] == 0.98 and thr["factor"] == 1.2
    assert thr["value"] > 0
    assert spec["detection"] == {"n": 2, "m": 3, "hysteresis": 4, "anomaly_duration": 10,
                                 "rule": "given"}
    assert spec["error_weights"] == {"method": "none"}
    width = w * len(FEATURES)
    assert spec["io"] == {"input": "input", "output": "output", "shape": [-1, width]}

    # the graph: float32 [batch, W*F] -> same
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto)
    assert os.path.getsize(out / "model.onnx") < 1_000_000
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "input" and outp.name == "output"
    assert inp.type == outp.type == "tensor(float)"
    assert inp.shape[1] == outp.shape[1] == width

    # engine-side preprocessing from model.json alone, then onnxruntime vs numpy
    mean = np.array(spec["scaler"]["mean"]).astype(np.float32)
    inv = (1.0 / np.array(spec["scaler"]["std"])).astype(np.float32)
    z = (raw.astype(np.float32) - mean) * inv
    windows = np.stack([z[i:i + w].reshape(-1) for i in range(n_rows - w + 1)]).astype(np.float32)
    got = sess.run(["output"], {"input": windows})[0]
    assert got.shape == windows.shape and got.dtype == np.float32
    ort_scores = np.mean((got.astype(np.float64) - windows.astype(np.float64)) ** 2, axis=1)

    trained = T.fit(raw, FEATURES, T.Config(family=family, window=w, threshold_method="quantile",
                                            quantile=0.98, factor=1.2,
                                            seed=3, hyper=T.hyper_from_args(_ns(family))),
                    label)
    np_scores = T.window_scores(windows, trained.model.reconstruct(windows))
    assert np.max(np.abs(np_scores - ort_scores)) < 1e-5
    # same seed -> same model -> same threshold
    assert trained.threshold == pytest.approx(thr["value"], rel=1e-12)
    train_windows = windows[T.windows_with_labels(label, n_rows, w)]
    train_scores = ort_scores[T.windows_with_labels(label, n_rows, w)]
    assert len(train_windows) == spec["training"]["windows"]
    assert thr["value"] == pytest.approx(np.quantile(train_scores, 0.98) * 1.2, rel=1e-9)

    # per-feature errors average to the score
    fe = T.feature_errors(windows, got, len(FEATURES))
    np.testing.assert_allclose(fe.mean(axis=1), ort_scores, rtol=1e-9, atol=1e-12)


def _ns(family):
    import argparse

    p = argparse.ArgumentParser()
    T.add_model_args(p)
    return p.parse_args(["--family", family, *FAMILY_ARGS[family]])


def test_parquet_input(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    csv = tmp_path / "t.csv"
    synthetic_csv(csv, labelled=[])
    pq = tmp_path / "t.parquet"
    pd.read_csv(csv, sep=";").to_parquet(pq)
    assert T.main(["--data", str(pq), "--out", str(tmp_path / "m"), "--window", "4",
                   "--features", *FEATURES, "--train-rows", "100"]) == 0
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["training"]["rows"] == 100 and spec["training"]["windows"] == 97


def test_windows_are_step_major():
    z = np.arange(12, dtype=np.float32).reshape(4, 3)  # 4 steps x 3 features
    w = T.make_windows(z, 2)
    assert w.shape == (3, 6)
    assert w[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert w[2].tolist() == [6, 7, 8, 9, 10, 11]
    assert T.make_windows(z, 5).shape == (0, 15)


def test_scaler_matches_engine_rule():
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    s = T.Scaler.fit(x)
    assert s.mean.tolist() == [2.0, 5.0] and s.std.tolist() == [1.0, 1.0]
    assert T.Scaler.fit(np.array([[0.0, 1.0], [2.0, 1.0]])).std.tolist() == [1.0, 1.0]
    z = s.transform(np.array([[4.0, 6.0]]))
    assert z.dtype == np.float32 and z.tolist() == [[2.0, 1.0]]


def test_n_of_m_rule():
    e = np.array([0, 1, 0, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    # plain thresholding
    assert T.n_of_m(e, 1, 1, 1).tolist() == e.astype(int).tolist()
    # opens at the 2nd exceedance within 3 windows, closes after 2 quiet windows
    assert T.n_of_m(e, 2, 3, 2).tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    # windows before the first one count as quiet; rows before the first window get 0
    flags = T.row_flags(np.array([5.0, 5.0, 0.0]), 1.0, 6, 4, 2, 2, 1)
    assert flags.tolist() == [0, 0, 0, 0, 1, 0]


def test_predicted_changepoints_follow_skab():
    flags = np.array([1, 1, 0, 0, 1, 1, 0])
    assert E.predicted_changepoints(flags).tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert E.predicted_changepoints(flags, "rising").tolist() == [1, 0, 0, 0, 1, 0, 0]


def test_nab_scoring():
    t = np.array("2020-01-01T00:00:00", dtype="datetime64[s]") + np.arange(200)
    true_cp = np.zeros(200, dtype=int)
    true_cp[[50, 150]] = 1
    pred = np.zeros(200, dtype=int)
    pred[[10, 50, 80, 180]] = 1
    part = E.nab_file(t, true_cp, pred, 60 * 10**9)
    # windows [50, 110] and [150, 210]: 50 and 80 are in the first (first counts), 180 in the
    # second at 30 s of 60 -> e = 500; 10 is a false positive
    assert part["windows"] == 2 and part["detected"] == 2 and part["fp"] == 1
    s, null, perfect = part["standard"]
    curve = E.nab_curve(1.0, -0.11)
    assert s == pytest.approx(curve[0] + curve[500] - 0.11)
    assert (null, perfect) == (-2.0, 2.0)
    total = E.nab_total([part])
    assert total["standard"] == pytest.approx(100 * (s + 2) / 4)
    # overlapping windows: the right one starts where the left one ends
    assert E.nab_windows(np.array([0, 10**9]), 60 * 10**9) == [[0, 60 * 10**9],
                                                              [60 * 10**9, 61 * 10**9]]
    # F1 / FAR / MAR
    m = E.binary_metrics(tp=8, tn=6, fp=2, fn=2)
    assert m["f1"] == pytest.approx(0.8) and m["far"] == pytest.approx(25.0)
    assert m["mar"] == pytest.approx(20.0)


def test_lake_input_and_registry(tmp_path):
    """A tidewatch lake (Hive partitions, the sink's columns) as training data, selected by
    time range and device, and the model published to a folder registry."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(3)
    start = dt.datetime(2026, 1, 1, 22, tzinfo=dt.timezone.utc)
    for hour in range(3):  # 22:00, 23:00 on the 1st, 00:00 on the 2nd
        stamp = start + dt.timedelta(hours=hour)
        folder = tmp_path / "lake" / f"date={stamp:%Y-%m-%d}" / f"hour={stamp:%H}"
        folder.mkdir(parents=True)
        times = [int(stamp.timestamp() * 1000) + i * 1000 for i in range(60)]
        table = pa.table({
            "device": pa.array(["pump-1", "pump-2"] * 30, pa.string()),
            "time": pa.array(times, pa.timestamp("ms", tz="UTC")),
            **{f: pa.array(rng.normal(size=60).astype(np.float32)) for f in FEATURES},
            "label": pa.array([0] * 60, pa.uint8()),
        })
        pq.write_table(table, folder / "part-0-1-0.parquet", compression="zstd")
    df = T.read_lake(f"file://{tmp_path / 'lake'}", start="2026-01-01T23:00:00Z",
                     end="2026-01-02T01:00:00Z", devices=["pump-1"])
    assert len(df) == 60 and set(df["device"]) == {"pump-1"}
    assert df["time"].is_monotonic_increasing
    registry = tmp_path / "registry"
    assert T.main(["--data", str(tmp_path / "lake"), "--out", str(tmp_path / "pump"),
                   "--window", "4", "--features", *FEATURES, "--version", "7",
                   "--registry", str(registry), "--promote"]) == 0
    assert (registry / "pump" / "ACTIVE").read_text().strip() == "7"
    spec = json.loads((registry / "pump" / "7" / "model.json").read_text())
    assert spec["version"] == "7" and spec["training"]["rows"] == 180
    assert (registry / "pump" / "7" / "model.onnx").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# Calibration from the training data (issue #16)
# --------------------------------------------------------------------------------------------

def test_pot_threshold_extrapolates_an_exponential_tail():
    # Exp(1) scores: the GPD of the excesses has shape 0 and scale 1, so the score a normal
    # window exceeds with probability `risk` is -log(risk).
    scores = np.random.default_rng(0).exponential(1.0, 200_000)
    fit = T.pot_threshold(scores, 1e-4, 0.95)
    assert fit["method"] == "pot" and fit["risk"] == 1e-4 and fit["initial_quantile"] == 0.95
    assert fit["initial_value"] == pytest.approx(-np.log(0.05), rel=0.02)
    assert abs(fit["shape"]) < 0.03 and fit["scale"] == pytest.approx(1.0, rel=0.05)
    assert fit["value"] == pytest.approx(-np.log(1e-4), rel=0.03)
    assert fit["excesses"] == pytest.approx(10_000, rel=0.01)
    # a smaller risk gives a higher threshold, above every training score but a few
    assert T.pot_threshold(scores, 1e-5, 0.95)["value"] > fit["value"]
    assert (scores > fit["value"]).mean() == pytest.approx(1e-4, rel=0.5)


def test_pot_threshold_adapts_to_a_heavy_tail():
    # Pareto scores (shape 0.5): the same risk lands far above the light-tailed threshold
    rng = np.random.default_rng(1)
    heavy = rng.pareto(2.0, 100_000)
    light = rng.exponential(np.mean(heavy), 100_000)
    fit_heavy = T.pot_threshold(heavy, 1e-4, 0.95)
    assert fit_heavy["shape"] > 0.2
    assert fit_heavy["value"] > 2 * T.pot_threshold(light, 1e-4, 0.95)["value"]


def test_pot_threshold_falls_back_to_the_maximum_on_a_short_tail():
    scores = np.linspace(0.0, 1.0, 100)  # 5 excesses over the 0.95 quantile
    fit = T.pot_threshold(scores, 1e-4, 0.95)
    assert fit["fallback"] == "max" and fit["value"] == 1.0
    flat = T.pot_threshold(np.ones(1000), 1e-4, 0.95)  # no excess at all
    assert flat["value"] == 1.0 and flat["excesses"] == 0


def test_detection_rule_follows_window_and_duration():
    assert T.detection_rule(10, 10) == (3, 5, 5)
    assert T.detection_rule(10, 100) == (5, 10, 10)  # capped at one window
    assert T.detection_rule(5, 100) == (3, 5, 5)
    assert T.detection_rule(10, 2) == (1, 1, 1)  # plain thresholding
    assert T.detection_rule(1, 50) == (1, 1, 1)
    assert T.Config(window=10, anomaly_duration=10, m=7).rule() == (3, 7, 5)


def test_residual_weights_cap_a_noisy_feature():
    errors = np.array([[1.0, 1.0, 1.0, 100.0]] * 3)
    w = T.residual_weights(errors)
    assert w.mean() == pytest.approx(1.0)
    assert w[0] == w[1] == w[2] and w[3] == pytest.approx(w[0] / 100)
    # its weighted error is no larger than the others'
    assert (errors[0] * w)[3] == pytest.approx((errors[0] * w)[0])


def test_defaults_calibrate_from_the_training_data(tmp_path):
    """The trainer's defaults: pot threshold, derived n-of-m, all written to model.json."""
    data = tmp_path / "train.csv"
    synthetic_csv(data, rows=400, labelled=())
    out = tmp_path / "model"
    assert T.main(["--data", str(data), "--out", str(out), "--features", *FEATURES]) == 0
    spec = json.loads((out / "model.json").read_text())
    thr = spec["threshold"]
    assert thr["method"] == "pot" and thr["risk"] == 1e-4 and thr["initial_quantile"] == 0.95
    assert thr["value"] >= thr["initial_value"] > 0
    assert spec["detection"] == {"n": 3, "m": 5, "hysteresis": 5, "anomaly_duration": 10,
                                 "rule": "derived"}
    out2 = tmp_path / "model2"
    assert T.main(["--data", str(data), "--out", str(out2), "--features", *FEATURES,
                   "--anomaly-duration", "40", "--window", "6"]) == 0
    spec2 = json.loads((out2 / "model.json").read_text())
    assert (spec2["detection"]["n"], spec2["detection"]["m"]) == (3, 6)
    # --quantile / --factor alone choose the quantile method, as before the pot default
    out3 = tmp_path / "model3"
    assert T.main(["--data", str(data), "--out", str(out3), "--features", *FEATURES,
                   "--factor", "2"]) == 0
    thr3 = json.loads((out3 / "model.json").read_text())["threshold"]
    assert thr3["method"] == "quantile" and thr3["quantile"] == 0.995 and thr3["factor"] == 2.0


@pytest.mark.parametrize("family", ["pca", "dense"])
def test_error_weights_fold_into_scaler_and_graph(tmp_path, family):
    """With --error-weights residual the engine's plain MSE on model.json + model.onnx equals
    the weighted per-feature error of the unweighted model."""
    import onnxruntime as ort

    data = tmp_path / "train.csv"
    raw, _ = synthetic_csv(data, rows=300, labelled=())
    raw = T.read_table(str(data))[FEATURES].to_numpy(dtype=np.float64)
    w = 5
    cfg = T.Config(family=family, window=w, error_weights="residual",
                   hyper={"components": 0.9} if family == "pca" else
                   {"hidden": (6,), "max_iter": 30})
    trained = T.fit(raw, FEATURES, cfg)
    weights = trained.weights
    assert weights is not None and weights.mean() == pytest.approx(1.0)
    # c has by far the largest error in z units: it is weighted down
    plain = T.fit(raw, FEATURES, T.Config(family=family, window=w, hyper=cfg.hyper))
    zw = T.make_windows(plain.scaler.transform(T.as_f32(raw)), w)
    fe = T.feature_errors(zw, plain.model.reconstruct(zw), len(FEATURES))
    assert np.argmax(fe.mean(axis=0)) == int(np.argmin(weights))

    T.save(trained, str(tmp_path / "m"), "m", "1", str(data))
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["error_weights"]["method"] == "residual"
    np.testing.assert_allclose(spec["error_weights"]["weights"], weights)
    # the engine's path: scaler from model.json, graph, plain MSE
    mean = np.array(spec["scaler"]["mean"]).astype(np.float32)
    inv = (1.0 / np.array(spec["scaler"]["std"])).astype(np.float32)
    xw = T.make_windows(((raw.astype(np.float32) - mean) * inv).astype(np.float32), w)
    sess = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(["output"], {"input": xw})[0]
    engine = T.window_scores(xw, got)
    if family == "pca":  # the same PCA under the weights: score = weighted error / F
        np.testing.assert_allclose(engine, fe @ weights / len(FEATURES), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(engine, trained.train_scores, rtol=1e-9, atol=1e-12)


def test_conv_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    k, f, c, w = 3, 4, 2, 5
    params = {"we": rng.normal(size=(k * f, c)), "be": rng.normal(size=c),
              "wd": rng.normal(size=(k * c, f)), "bd": rng.normal(size=f)}
    x = rng.normal(size=(7, w, f))
    _, grads = T.ConvModel.loss_and_grads(params, x, k, 0.01)
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + 1e-6
            plus, _ = T.ConvModel.loss_and_grads(params, x, k, 0.01)
            p[i] = old - 1e-6
            minus, _ = T.ConvModel.loss_and_grads(params, x, k, 0.01)
            p[i] = old
            numeric[i] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7, err_msg=name)


def test_conv_graph_is_the_convolution_written_out():
    """The banded MatMuls of the exported graph compute the "same" convolutions: each step's
    reconstruction depends only on the K steps around it."""
    raw, _ = synthetic_csv_arrays()
    z = T.Scaler.fit(T.as_f32(raw)).transform(T.as_f32(raw))
    xw = T.make_windows(z, 8)
    model = T.ConvModel(features=4, channels=3, kernel=3, epochs=5).fit(xw, seed=1)
    assert model.losses[-1] < model.losses[0]  # it learns
    p = model.params_
    x = xw[:5].astype(np.float64).reshape(5, 8, 4)
    h = np.tanh(T._unfold(x, 3) @ p["we"] + p["be"])
    direct = T._unfold(h, 3) @ p["wd"] + p["bd"]
    np.testing.assert_allclose(model.reconstruct(xw[:5]).reshape(5, 8, 4), direct, atol=1e-4)
    # changing step 0 leaves steps 3.. untouched (kernel 3: two layers see 2 steps away)
    moved = xw[:1].copy()
    moved[0, :4] += 5.0
    delta = np.abs(model.reconstruct(moved) - model.reconstruct(xw[:1])).reshape(8, 4)
    assert delta[:3].max() > 0 and delta[3:].max() == 0


def synthetic_csv_arrays(rows=200):
    rng = np.random.default_rng(3)
    t = np.arange(rows)
    a = np.sin(t / 7.0) + 0.05 * rng.standard_normal(rows)
    raw = np.stack([a, 0.5 * a + 0.1 * rng.standard_normal(rows), np.cos(t / 5.0),
                    rng.standard_normal(rows)], axis=1)
    return raw, t
