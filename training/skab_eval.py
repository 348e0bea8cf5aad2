#!/usr/bin/env python3
"""Reference SKAB leaderboard evaluation of a tidewatch detection configuration.

Protocol (SKAB "strict" leaderboard): for each of the 34 labelled files (valve1/*, valve2/*,
other/*), the scaler, the model and the threshold are fitted on the first 400 rows; the
remaining rows are scored; all test rows are pooled over files.

  outlier metrics   F1 = TP / (TP + (FP + FN) / 2), FAR = 100 FP / (FP + TN),
                    MAR = 100 FN / (FN + TP) over the pooled test rows (label: `anomaly`).
  changepoint (NAB) predicted changepoints are the edges of the predicted flag, as SKAB
                    derives them: |flag[t] - flag[t-1]| with the first test row taking its own
                    flag (so both rising and falling edges count; `--edges rising` keeps only
                    rising ones). Every true changepoint (`changepoint` == 1 in the test rows)
                    gets a window [t, t + 60 s] (right of it; `--nab-window`); overlapping
                    windows are resolved by moving the right one's start to the left one's end.
                    The first predicted changepoint inside a window scores
                    y(e) = (A_tp - A_fp)/2 * (-tanh(x_e) / tanh(pi/2)) + (A_tp - A_fp)/2 + A_fp,
                    x = linspace(-pi/2, pi/2, 1000), e = int((t_det - t0)/(t1 - t0) * 1000)
                    (clipped to 999); a window without one costs A_fn; a predicted changepoint
                    outside all windows costs A_fp. Profiles (A_tp, A_fp, A_fn): standard
                    (1, -0.11, -1), low FP (1, -0.22, -1), low FN (1, -0.11, -2). Summed over
                    files and normalised as 100 (S - S_null) / (S_perfect - S_null), with
                    S_null = n_windows * A_fn and S_perfect = n_windows * A_tp.

Streaming (the tidewatch engine): by default each file is streamed whole, the 400 training rows
prime the windows and the n-of-m state, and only test rows are pooled (`--no-prime`: windows
start at the first test row and its first W-1 rows get flag 0).

The scores come from onnxruntime on the exported graph; `--export DIR` writes every per-file
model (DIR/<group>_<file>/model.onnx + model.json) and DIR/<group>_<file>/scores.csv (row,
score, exceed, flag for every row of the file) for the Rust backtest to reproduce.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as T  # noqa: E402

DEFAULT_DATA = os.environ.get("SKAB_DATA", "/work/shared/data/skab/data")
TRAIN_ROWS = 400
PROFILES = {"standard": (1.0, -0.11, -1.0), "low_fp": (1.0, -0.22, -1.0),
            "low_fn": (1.0, -0.11, -2.0)}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def skab_files(root: str) -> list[str]:
    def key(path):
        return (os.path.basename(os.path.dirname(path)),
                int(os.path.splitext(os.path.basename(path))[0]))
    files = []
    for group in ("valve1", "valve2", "other"):
        files += sorted(glob.glob(os.path.join(root, group, "*.csv")), key=key)
    return files


class SkabFile:
    def __init__(self, path: str):
        import pandas as pd

        df = pd.read_csv(path, sep=";", float_precision="round_trip")
        self.path = path
        self.name = f"{os.path.basename(os.path.dirname(path))}_{os.path.splitext(os.path.basename(path))[0]}"
        self.times = pd.to_datetime(df["datetime"]).to_numpy().astype("datetime64[ns]")
        self.raw = df[T.SKAB_FEATURES].to_numpy(dtype=np.float64)
        self.anomaly = df["anomaly"].to_numpy().astype(np.int8)
        self.changepoint = df["changepoint"].to_numpy().astype(np.int8)


def load_skab(root: str = DEFAULT_DATA) -> list[SkabFile]:
    files = skab_files(root)
    if len(files) != 34:
        raise SystemExit(f"expected 34 labelled SKAB files under {root}, found {len(files)}")
    return [SkabFile(f) for f in files]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def confusion(true: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    t = np.asarray(true) == 1
    p = np.asarray(pred) == 1
    return int((t & p).sum()), int((~t & ~p).sum()), int((~t & p).sum()), int((t & ~p).sum())


def binary_metrics(tp: int, tn: int, fp: int, fn: int) -> dict:
    return {"f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 0.0,
            "far": 100.0 * fp / (fp + tn) if fp + tn else 0.0,
            "mar": 100.0 * fn / (fn + tp) if fn + tp else 0.0,
            "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def predicted_changepoints(flags: np.ndarray, edges: str = "both") -> np.ndarray:
    """SKAB: cp = |diff(flag)|, cp[0] = flag[0]. edges='rising' keeps only 0 -> 1."""
    f = np.asarray(flags, dtype=np.int64)
    if len(f) == 0:
        return f
    d = np.diff(f, prepend=0)
    return (d > 0).astype(np.int8) if edges == "rising" else (d != 0).astype(np.int8)


def nab_windows(cp_times: np.ndarray, width_ns: int, side: str = "right") -> list[list[int]]:
    """[start, end] (int ns, inclusive) per true changepoint; overlaps cut on the right window."""
    out = []
    for t in cp_times.astype(np.int64):
        if side == "right":
            out.append([int(t), int(t) + width_ns])
        elif side == "left":
            out.append([int(t) - width_ns, int(t)])
        else:
            out.append([int(t) - width_ns // 2, int(t) + width_ns // 2])
    for i in range(len(out) - 1):
        if out[i][1] >= out[i + 1][0]:
            out[i + 1][0] = out[i][1]
    return out


_NAB_X = np.linspace(-np.pi / 2, np.pi / 2, 1000)


def nab_curve(a_tp: float, a_fp: float) -> np.ndarray:
    half = (a_tp - a_fp) / 2
    return half * -np.tanh(_NAB_X) / np.tanh(np.pi / 2) + half + a_fp


def nab_file(times: np.ndarray, true_cp: np.ndarray, pred_cp: np.ndarray, width_ns: int,
             side: str = "right") -> dict:
    """Per-file NAB parts: for every profile (score, null, perfect), and the counts."""
    t_ns = times.astype("datetime64[ns]").astype(np.int64)
    windows = nab_windows(t_ns[np.asarray(true_cp) == 1], width_ns, side)
    det = t_ns[np.asarray(pred_cp) == 1]
    fps = 0
    tps = []  # (start, first detection, end)
    if windows:
        fps += int((det < windows[0][0]).sum())
        for i, (a, b) in enumerate(windows):
            inside = det[(det >= a) & (det <= b)]
            if len(inside):
                tps.append((a, int(inside[0]), b))
            if i + 1 < len(windows):
                fps += int(((det > b) & (det < windows[i + 1][0])).sum())
        fps += int((det > windows[-1][1]).sum())
    else:
        fps += len(det)
    fns = len(windows) - len(tps)
    out = {"windows": len(windows), "detected": len(tps), "missed": fns, "fp": fps,
           "delays_s": [(d - a) / 1e9 for a, d, _ in tps]}
    for name, (a_tp, a_fp, a_fn) in PROFILES.items():
        curve = nab_curve(a_tp, a_fp)
        s = a_fp * fps + a_fn * fns
        for a, d, b in tps:
            e = int((d - a) / (b - a) * 1000) if b > a else 0
            s += curve[min(e, 999)]
        out[name] = (s, len(windows) * a_fn, len(windows) * a_tp)
    return out


def nab_total(parts: list[dict]) -> dict:
    out = {}
    for name in PROFILES:
        s = sum(p[name][0] for p in parts)
        null = sum(p[name][1] for p in parts)
        perfect = sum(p[name][2] for p in parts)
        out[name] = 100.0 * (s - null) / (perfect - null) if perfect != null else 0.0
    out["windows"] = sum(p["windows"] for p in parts)
    out["detected"] = sum(p["detected"] for p in parts)
    out["missed"] = sum(p["missed"] for p in parts)
    out["fp"] = sum(p["fp"] for p in parts)
    delays = [d for p in parts for d in p["delays_s"]]
    out["mean_delay_s"] = float(np.mean(delays)) if delays else float("nan")
    return out


def leaderboard(files: list[SkabFile], test_flags: list[np.ndarray], edges: str = "both",
                nab_window_s: float = 60.0, side: str = "right") -> dict:
    """Pooled F1/FAR/MAR and NAB over the test rows (rows >= TRAIN_ROWS) of every file."""
    tp = tn = fp = fn = 0
    parts = []
    width_ns = int(round(nab_window_s * 1e9))
    for f, flags in zip(files, test_flags):
        a = f.anomaly[TRAIN_ROWS:]
        c = confusion(a, flags)
        tp, tn, fp, fn = tp + c[0], tn + c[1], fp + c[2], fn + c[3]
        parts.append(nab_file(f.times[TRAIN_ROWS:], f.changepoint[TRAIN_ROWS:],
                              predicted_changepoints(flags, edges), width_ns, side))
    out = binary_metrics(tp, tn, fp, fn)
    nab = nab_total(parts)
    out.update({"nab_" + k: v for k, v in nab.items()})
    out["rows"] = tp + tn + fp + fn
    return out


# --------------------------------------------------------------------------------------------
# Scoring a configuration
# --------------------------------------------------------------------------------------------

class Scored:
    """Per-file training scores and stream scores of one (family, window, hyper) choice; the
    detection parameters (quantile, factor, n, m, hysteresis) are applied afterwards."""

    def __init__(self, files, config: T.Config, prime: bool = True, use_labels: bool = False,
                 keep_models: bool = False):
        self.files, self.config, self.prime = files, config, prime
        self.train_scores, self.stream, self.trained = [], [], []
        self.max_diff = 0.0
        for f in files:
            labels = f.anomaly[:TRAIN_ROWS] if use_labels else None
            tr = T.fit(f.raw[:TRAIN_ROWS], T.SKAB_FEATURES, config, labels)
            raw = f.raw if prime else f.raw[TRAIN_ROWS:]
            z = tr.scaler.transform(T.as_f32(raw))
            xw = T.make_windows(z, config.window)
            recon = T.ort_reconstruct(tr.session, xw)
            self.stream.append(T.window_scores(xw, recon))
            numpy_scores = T.window_scores(xw, tr.model.reconstruct(xw))
            if len(xw):
                self.max_diff = max(self.max_diff,
                                    float(np.max(np.abs(numpy_scores - self.stream[-1]))))
            self.train_scores.append(tr.train_scores)
            self.trained.append(tr if keep_models else None)

    def flags(self, quantile, factor, n, m, hysteresis, windows="rows", calibrate=None):
        """(full-stream flags, test flags, thresholds) per file. The threshold is the training
        scores' quantile x factor, or `calibrate(training scores)` when given.

        windows="rows": the contract (a window = the last W rows, whatever their timestamps).
        windows="time": the engine's time windows [e - W s, e) every second, dropped unless they
        hold W readings; the n-of-m rule sees only the kept ones and a row whose window
        (e = its time + 1 s) was dropped gets flag 0 (as the Rust backtest's predict())."""
        out_full, out_test, thresholds = [], [], []
        w = self.config.window
        for f, ts, ss in zip(self.files, self.train_scores, self.stream):
            thr = (calibrate(ts) if calibrate is not None
                   else T.calibrate_threshold(ts, quantile, factor))
            n_rows = len(f.raw) if self.prime else len(f.raw) - TRAIN_ROWS
            if windows == "time":
                t = f.times if self.prime else f.times[TRAIN_ROWS:]
                sec = t.astype("datetime64[s]").astype(np.int64)
                kept = np.zeros(len(ss), dtype=bool)  # window k ends at row k + w - 1
                if len(ss):
                    kept = (sec[w - 1:] - sec[: len(sec) - w + 1]) == w - 1
                states = T.n_of_m(ss[kept] > thr, n, m, hysteresis)
                flags = np.zeros(n_rows, dtype=np.int8)
                flags[np.nonzero(kept)[0] + w - 1] = states
            else:
                flags = T.row_flags(ss, thr, n_rows, w, n, m, hysteresis)
            out_full.append(flags)
            out_test.append(flags[TRAIN_ROWS:] if self.prime else flags)
            thresholds.append(thr)
        return out_full, out_test, thresholds

    def evaluate(self, quantile, factor, n, m, hysteresis, edges="both", nab_window_s=60.0,
                 side="right", windows="rows", calibrate=None):
        _, test, _ = self.flags(quantile, factor, n, m, hysteresis, windows, calibrate)
        return leaderboard(self.files, test, edges, nab_window_s, side)


def export(scored: Scored, out_dir: str, cfg: T.Config) -> None:
    full, _, thresholds = scored.flags(cfg.quantile, cfg.factor, *cfg.rule(),
                                       calibrate=lambda ts: T.calibrate(ts, cfg)["value"])
    w = cfg.window
    for f, tr, ss, flags in zip(scored.files, scored.trained, scored.stream, full):
        d = os.path.join(out_dir, f.name)
        T.save(tr, d, f"skab-{f.name}", "skab-eval", f.path)
        n_rows = len(flags)
        offset = 0 if scored.prime else TRAIN_ROWS
        with open(os.path.join(d, "scores.csv"), "w") as fh:
            fh.write("row,score,exceed,flag\n")
            for r in range(n_rows):
                k = r - (w - 1)
                if k >= 0:
                    fh.write(f"{r + offset},{float(ss[k])!r},{int(ss[k] > tr.threshold)},{flags[r]}\n")
                else:
                    fh.write(f"{r + offset},,,{flags[r]}\n")


def fmt_row(label: str, r: dict) -> str:
    return (f"{label:<44} F1 {r['f1']:.4f}  FAR {r['far']:6.2f}  MAR {r['mar']:6.2f}  "
            f"NAB std {r['nab_standard']:6.2f} lowFP {r['nab_low_fp']:6.2f} "
            f"lowFN {r['nab_low_fn']:6.2f}  cps {r['nab_detected']}/{r['nab_windows']} "
            f"fp_cp {r['nab_fp']}  rows {r['rows']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="SKAB data folder (holds valve1/ ...)")
    T.add_model_args(p, defaults=CHOSEN)
    p.add_argument("--no-prime", action="store_true",
                   help="windows start at the first test row instead of spanning the training rows")
    p.add_argument("--use-labels", action="store_true",
                   help="leave labelled rows out of training (other/2 has its anomaly there); "
                        "the leaderboard protocol does not")
    p.add_argument("--edges", choices=("both", "rising"), default="both",
                   help="predicted changepoints: both edges (SKAB) or rising edges only")
    p.add_argument("--nab-window", type=float, default=60.0, help="NAB window width, seconds")
    p.add_argument("--nab-side", choices=("right", "center", "left"), default="right")
    p.add_argument("--windows", choices=("rows", "time"), default="rows",
                   help="rows: a window is the last W rows (the contract); time: emulate the "
                        "engine's 1 s-aligned time windows that drop windows with < W readings")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--export", default=None,
                   help="write per-file models and scores under this folder (for the Rust backtest)")
    args = p.parse_args(argv)

    cfg = T.config_from_args(args)
    files = load_skab(args.data)
    t0 = time.time()
    scored = Scored(files, cfg, prime=not args.no_prime, use_labels=args.use_labels,
                    keep_models=args.export is not None)
    n, m, h = cfg.rule()
    r = scored.evaluate(cfg.quantile, cfg.factor, n, m, h, args.edges,
                        args.nab_window, args.nab_side, args.windows,
                        calibrate=lambda ts: T.calibrate(ts, cfg)["value"])
    r["max_abs_numpy_vs_onnxruntime"] = scored.max_diff
    r["config"] = {"family": cfg.family, "window": cfg.window, "hyper": cfg.hyper,
                   "threshold_method": cfg.threshold_method, "risk": cfg.risk,
                   "initial_quantile": cfg.initial_quantile,
                   "quantile": cfg.quantile, "factor": cfg.factor,
                   "error_weights": cfg.error_weights, "anomaly_duration": cfg.anomaly_duration,
                   "n": n, "m": m, "hysteresis": h, "seed": cfg.seed, "prime": not args.no_prime,
                   "use_labels": args.use_labels, "edges": args.edges,
                   "nab_window_s": args.nab_window, "nab_side": args.nab_side,
                   "windows": args.windows}
    r["seconds"] = round(time.time() - t0, 1)
    if args.export:
        export(scored, args.export, cfg)
    if args.json:
        json.dump(r, sys.stdout, indent=2, default=float)
        print()
    else:
        threshold = (f"pot risk={cfg.risk} q0={cfg.initial_quantile}"
                     if cfg.threshold_method == "pot" else f"q={cfg.quantile} k={cfg.factor}")
        label = f"{cfg.family} W={cfg.window} {threshold} n/m/h={n}/{m}/{h}"
        print(fmt_row(label, r))
        print(f"max |numpy - onnxruntime| score difference: {scored.max_diff:.2e}")
    return 0 if scored.max_diff < 1e-5 else 1


# The chosen configuration (docs/detection.md); the defaults of this script.
CHOSEN = {"family": "pca", "window": 10, "threshold_method": "pot", "risk": 1e-4,
          "initial_quantile": 0.95, "error_weights": "none", "anomaly_duration": 10,
          "components": 0.8}

if __name__ == "__main__":
    sys.exit(main())
