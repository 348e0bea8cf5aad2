//! Detection quality metrics, as SKAB's leaderboard computes them.
//!
//! - Point metrics over pooled rows: F1 = TP / (TP + (FP + FN) / 2), FAR = 100·FP / (FP + TN),
//!   MAR = 100·FN / (FN + TP), precision, recall.
//! - The changepoint (NAB-style) score: predicted changepoints are the edges of the predicted
//!   flag (|diff|, the first row counting as an edge when flagged); each true changepoint gets
//!   a window of `window_ms` to its right (windows that would overlap are cut on the right);
//!   only the first prediction inside a window counts, scored on SKAB's "improved" tanh curve
//!   between `A_tp` (at the window's start) and `A_fp` (at its end); predictions outside every
//!   window are false positives, windows without one are misses. Per profile the pooled score
//!   is normalised as `100·(S − S_null) / (S_perfect − S_null)`.

use serde::Serialize;

/// One series' truth and prediction, row by row (same length, time ascending).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// Event time of each row, ms.
    pub times: Vec<i64>,
    /// True anomaly label of each row.
    pub labels: Vec<bool>,
    /// True changepoints (rows where an anomaly starts or ends, as labelled).
    pub changepoints: Vec<bool>,
    /// Predicted anomaly flag of each row.
    pub predicted: Vec<bool>,
}

/// The NAB profile coefficients `(A_tp, A_fp, A_fn)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    /// Reward of a detection at the very start of a window.
    pub a_tp: f64,
    /// Cost of a false positive.
    pub a_fp: f64,
    /// Cost of a missed window.
    pub a_fn: f64,
}

/// Standard, low-FP and low-FN profiles.
pub const PROFILES: [Profile; 3] = [
    Profile { a_tp: 1.0, a_fp: -0.11, a_fn: -1.0 },
    Profile { a_tp: 1.0, a_fp: -0.22, a_fn: -1.0 },
    Profile { a_tp: 1.0, a_fp: -0.11, a_fn: -2.0 },
];

/// The report `tidewatch backtest` prints.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Test rows pooled.
    pub rows: u64,
    /// True positives (rows).
    pub tp: u64,
    /// True negatives.
    pub tn: u64,
    /// False positives.
    pub fp: u64,
    /// False negatives.
    pub r#fn: u64,
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// TP / (TP + (FP + FN) / 2).
    pub f1: f64,
    /// False alarm rate, %.
    pub far: f64,
    /// Missed alarm rate, %.
    pub mar: f64,
    /// Changepoint score, standard profile.
    pub nab_standard: f64,
    /// Changepoint score, low-FP profile.
    pub nab_lowfp: f64,
    /// Changepoint score, low-FN profile.
    pub nab_lowfn: f64,
    /// True changepoints.
    pub changepoints: u64,
    /// Changepoints detected within their window.
    pub changepoints_detected: u64,
    /// Predicted changepoints outside every window.
    pub changepoints_false: u64,
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 { 0.0 } else { numerator / denominator }
}

/// SKAB's "improved" scoring curve at relative position `position` (0 = window start).
pub fn scaled_reward(position: f64, profile: Profile) -> f64 {
    const DETAIL: usize = 1000;
    let mut index = (position * DETAIL as f64) as i64;
    index = index.clamp(0, DETAIL as i64 - 1);
    let x =
        -std::f64::consts::FRAC_PI_2 + std::f64::consts::PI * index as f64 / (DETAIL - 1) as f64;
    let span = profile.a_tp - profile.a_fp;
    span / 2.0 * -x.tanh() / std::f64::consts::FRAC_PI_2.tanh() + span / 2.0 + profile.a_fp
}

/// Per-series changepoint tallies: for each profile `(score, null, perfect)`.
fn nab_series(
    series: &Series,
    window_ms: i64,
    totals: &mut [[f64; 3]; 3],
    counts: &mut (u64, u64, u64),
) {
    // True changepoint windows [t, t + width], cut so they do not overlap.
    let mut windows: Vec<(i64, i64)> = series
        .times
        .iter()
        .zip(&series.changepoints)
        .filter(|(_, changepoint)| **changepoint)
        .map(|(time, _)| (*time, *time + window_ms))
        .collect();
    for index in 1..windows.len() {
        if windows[index - 1].1 >= windows[index].0 {
            windows[index].0 = windows[index - 1].1;
        }
    }
    // Predicted changepoints: edges of the flag.
    let predicted: Vec<i64> = series
        .predicted
        .iter()
        .enumerate()
        .filter(
            |(index, flag)| {
                if *index == 0 { **flag } else { **flag != series.predicted[index - 1] }
            },
        )
        .map(|(index, _)| series.times[index])
        .collect();
    // As SKAB's code does: each window takes its first prediction inside [start, end] (a
    // prediction on the boundary two cut windows share counts for both); predictions before
    // the first window, strictly between two windows, or after the last are false positives.
    let detections: Vec<Option<i64>> = windows
        .iter()
        .map(|(start, end)| predicted.iter().copied().find(|time| time >= start && time <= end))
        .collect();
    let mut false_positives = 0u64;
    match (windows.first(), windows.last()) {
        (Some((first_start, _)), Some((_, last_end))) => {
            false_positives += predicted.iter().filter(|time| *time < first_start).count() as u64;
            for pair in windows.windows(2) {
                let (end, next_start) = (pair[0].1, pair[1].0);
                false_positives +=
                    predicted.iter().filter(|time| **time > end && **time < next_start).count()
                        as u64;
            }
            false_positives += predicted.iter().filter(|time| *time > last_end).count() as u64;
        }
        _ => false_positives += predicted.len() as u64,
    }
    let detected = detections.iter().filter(|detection| detection.is_some()).count() as u64;
    let missed = windows.len() as u64 - detected;
    counts.0 += windows.len() as u64;
    counts.1 += detected;
    counts.2 += false_positives;
    for (profile, total) in PROFILES.iter().zip(totals.iter_mut()) {
        let mut score = profile.a_fp * false_positives as f64 + profile.a_fn * missed as f64;
        for ((start, end), detection) in windows.iter().zip(&detections) {
            if let Some(time) = detection {
                let position = ratio((*time - *start) as f64, (*end - *start) as f64);
                score += scaled_reward(position, *profile);
            }
        }
        total[0] += score;
        total[1] += windows.len() as f64 * profile.a_fn;
        total[2] += windows.len() as f64 * profile.a_tp;
    }
}

/// Pools every series and computes the report.
pub fn evaluate(series: &[Series], changepoint_window_ms: i64) -> Report {
    let mut report = Report::default();
    let mut totals = [[0f64; 3]; 3];
    let mut counts = (0u64, 0u64, 0u64);
    for one in series {
        for (label, predicted) in one.labels.iter().zip(&one.predicted) {
            match (label, predicted) {
                (true, true) => report.tp += 1,
                (false, false) => report.tn += 1,
                (false, true) => report.fp += 1,
                (true, false) => report.r#fn += 1,
            }
        }
        report.rows += one.labels.len() as u64;
        nab_series(one, changepoint_window_ms, &mut totals, &mut counts);
    }
    let (tp, tn, fp, fn_) =
        (report.tp as f64, report.tn as f64, report.fp as f64, report.r#fn as f64);
    report.precision = ratio(tp, tp + fp);
    report.recall = ratio(tp, tp + fn_);
    report.f1 = ratio(tp, tp + (fp + fn_) / 2.0);
    report.far = 100.0 * ratio(fp, fp + tn);
    report.mar = 100.0 * ratio(fn_, fn_ + tp);
    let normalised: Vec<f64> = totals
        .iter()
        .map(|[score, null, perfect]| 100.0 * ratio(score - null, perfect - null))
        .collect();
    report.nab_standard = normalised[0];
    report.nab_lowfp = normalised[1];
    report.nab_lowfn = normalised[2];
    report.changepoints = counts.0;
    report.changepoints_detected = counts.1;
    report.changepoints_false = counts.2;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(labels: &[u8], predicted: &[u8]) -> Series {
        let labels: Vec<bool> = labels.iter().map(|value| *value == 1).collect();
        let changepoints = labels
            .iter()
            .enumerate()
            .map(|(index, label)| index > 0 && *label != labels[index - 1])
            .collect();
        Series {
            times: (0..labels.len() as i64).map(|second| second * 1000).collect(),
            labels,
            changepoints,
            predicted: predicted.iter().map(|value| *value == 1).collect(),
        }
    }

    #[test]
    fn the_curve_runs_from_a_tp_to_a_fp() {
        let profile = PROFILES[0];
        assert!((scaled_reward(0.0, profile) - 1.0).abs() < 1e-9);
        assert!((scaled_reward(1.0, profile) - -0.11).abs() < 1e-9);
        let middle = scaled_reward(0.5, profile);
        assert!((middle - 0.445).abs() < 0.01, "{middle}");
    }

    #[test]
    fn point_metrics_from_a_known_confusion_matrix() {
        // TP = 3, FN = 1, FP = 2, TN = 4.
        let one = series(&[0, 0, 1, 1, 1, 1, 0, 0, 0, 0], &[1, 0, 1, 1, 1, 0, 1, 0, 0, 0]);
        let report = evaluate(&[one], 60_000);
        assert_eq!((report.tp, report.r#fn, report.fp, report.tn), (3, 1, 2, 4));
        assert!((report.f1 - 3.0 / (3.0 + 1.5)).abs() < 1e-12);
        assert!((report.far - 100.0 * 2.0 / 6.0).abs() < 1e-12);
        assert!((report.mar - 25.0).abs() < 1e-12);
        assert!((report.precision - 0.6).abs() < 1e-12);
        assert!((report.recall - 0.75).abs() < 1e-12);
        assert_eq!(report.rows, 10);
    }

    #[test]
    fn perfect_and_null_detectors_score_100_and_0() {
        let labels = [0, 0, 0, 1, 1, 1, 1, 0, 0, 0];
        let perfect = evaluate(&[series(&labels, &labels)], 1_000);
        // Changepoints at rows 3 (start) and 7 (end); the prediction's edges hit both at once.
        assert_eq!(perfect.changepoints, 2);
        assert_eq!(perfect.changepoints_detected, 2);
        assert!((perfect.nab_standard - 100.0).abs() < 1e-9, "{perfect:?}");
        let null = evaluate(&[series(&labels, &[0; 10])], 1_000);
        assert!(null.nab_standard.abs() < 1e-9, "{null:?}");
        assert!((null.mar - 100.0).abs() < 1e-12);
    }

    #[test]
    fn a_late_detection_earns_less_and_a_false_edge_costs() {
        let labels = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1];
        // Detected 2 s into a 4 s window, plus one false alarm at row 0.
        let report = evaluate(&[series(&labels, &[1, 0, 0, 0, 0, 1, 1, 1, 1, 1])], 4_000);
        assert_eq!(report.changepoints_detected, 1);
        // Edges at rows 0 (false), 1 (the flag falls: outside the window, false), 5 (detection).
        assert_eq!(report.changepoints_false, 2);
        let profile = PROFILES[0];
        let expected_score = scaled_reward(0.5, profile) + 2.0 * profile.a_fp;
        let expected = 100.0 * (expected_score - profile.a_fn) / (profile.a_tp - profile.a_fn);
        assert!(
            (report.nab_standard - expected).abs() < 1e-9,
            "{} vs {expected}",
            report.nab_standard
        );
    }
}
