#!/usr/bin/env python3
"""Checks skab_eval's metric code against figures SKAB publishes.

Re-implements (independently, from the method's description) SKAB's Hotelling T-squared and
T-squared + Q (PCA) baselines with their published settings: standard scaling and PCA on the
first 400 rows, 85 % explained variance, p = 0.999 control limits (F-distribution limit for
T2, Jackson-Mudholkar limit for Q, both read off a 10,000-point grid on [0, 15] as SKAB does,
including its use of (sum of residual eigenvalues)^i for theta_i), a rolling median of 5 over
the whole file, alarm when either statistic exceeds its limit; test rows (400 on) pooled.

SKAB strict leaderboard (test rows only, NAB windows to the right, 30 s):
  T-squared+Q  F1 0.76  FAR 26.62  MAR 24.92  NAB 13.57 / -0.22 / 19.55 (67 missed CPs, 121 FPs)
  T-squared    F1 0.66  FAR 19.21  MAR 42.60  NAB 11.98 /  0.99 / 16.65 (70 missed CPs, 106 FPs)

Usage: .venv/bin/python training/skab_baselines.py [--data DIR] [--nab-window 30]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import skab_eval as E  # noqa: E402

PUBLISHED = {
    "t2q": {"f1": 0.76, "far": 26.62, "mar": 24.92, "nab_standard": 13.57, "nab_low_fp": -0.22,
            "nab_low_fn": 19.55, "nab_missed": 67, "nab_fp": 121},
    "t2": {"f1": 0.66, "far": 19.21, "mar": 42.60, "nab_standard": 11.98, "nab_low_fp": 0.99,
           "nab_low_fn": 16.65, "nab_missed": 70, "nab_fp": 106},
}


def _grid_limit(cdf, p):
    grid = np.linspace(0, 15, 10000)
    return grid[cdf(grid) < p][-1]


def t2q_flags(raw: np.ndarray, train_rows: int, use_q: bool, p: float = 0.999,
              explained: float = 0.85, median: int = 5) -> np.ndarray:
    import pandas as pd
    from scipy import stats
    from sklearn.decomposition import PCA

    train = raw[:train_rows]
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    xt = (train - mean) / std
    x = (raw - mean) / std
    n = len(xt)
    if use_q:
        pca = PCA(n_components=explained).fit(xt)
        k = pca.n_components_
        scores_t = pca.transform(xt)
        inv_cov = np.linalg.inv(np.cov(scores_t.T))
        ev = pca.components_.T
        resid = np.eye(ev.shape[0]) - ev @ ev.T
        w = np.linalg.eig(np.cov(xt.T))[0]
        rest = float(np.real(np.sum(w[k:])))
        th = [rest ** i for i in (1, 2, 3)]
        h0 = 1 - 2 * th[0] * th[2] / (3 * th[1] ** 2)
        c = _grid_limit(stats.norm.cdf, p)
        q_ucl = th[0] * (1 + c * h0 * np.sqrt(2 * th[1]) / th[0]
                         + th[1] * h0 * (h0 - 1) / th[0] ** 2) ** (1 / h0)
        s = pca.transform(x)
        t2 = np.einsum("ij,jk,ik->i", s, inv_cov, s)
        q = np.einsum("ij,jk,ik->i", x, resid, x)
    else:
        k = xt.shape[1]
        inv_cov = np.linalg.inv(np.cov(xt.T))
        t2 = np.einsum("ij,jk,ik->i", x, inv_cov, x)
        q = None
    c = _grid_limit(lambda g: stats.f.cdf(g, k, n - k), p)
    t2_ucl = k * (n - 1) * (n + 1) / (n * (n - k)) * c
    t2m = pd.Series(t2).rolling(median).median().to_numpy()
    flag = t2m > t2_ucl
    if use_q:
        qm = pd.Series(q).rolling(median).median().to_numpy()
        flag = flag | (qm > q_ucl)
    return flag.astype(np.int8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=E.DEFAULT_DATA)
    ap.add_argument("--nab-window", type=float, default=30.0)
    args = ap.parse_args(argv)
    files = E.load_skab(args.data)
    for name, use_q in (("t2q", True), ("t2", False)):
        flags = [t2q_flags(f.raw, E.TRAIN_ROWS, use_q)[E.TRAIN_ROWS:] for f in files]
        r = E.leaderboard(files, flags, nab_window_s=args.nab_window)
        print(E.fmt_row(f"{name} (ours, NAB {args.nab_window:g} s right)", r))
        pub = PUBLISHED[name]
        print(f"{name + ' (published, strict)':<44} F1 {pub['f1']:.2f}    FAR {pub['far']:6.2f}  "
              f"MAR {pub['mar']:6.2f}  NAB std {pub['nab_standard']:6.2f} lowFP "
              f"{pub['nab_low_fp']:6.2f} lowFN {pub['nab_low_fn']:6.2f}  missed "
              f"{pub['nab_missed']} fp_cp {pub['nab_fp']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
