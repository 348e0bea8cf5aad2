//! The NAB protocol: the Numenta Anomaly Benchmark's corpus (`data/<category>/<file>.csv`,
//! `timestamp,value`) and its labelled windows (`labels/combined_windows.json`), scored the way
//! NAB's own sweeper scores a detector.
//!
//! Per file, the model trains on the probationary rows (the first 15 %, at most 750, which NAB
//! gives every detector to learn in), the whole file streams through the pipeline, and the
//! alarms after the probationary period are NAB's detections. An alarm is the row where the
//! debounced flag opens (one alert per alarm, as a tidewatch alerting sink sends it); NAB would
//! count every row of an alarm that stays open as a further detection, which a detector that
//! holds its flag (hysteresis) pays for as false positives ([`onsets`]).
//!
//! - a detection inside a window scores `A_tp · S(p) / S(-1)`, with `S(p) = 2·sigmoid(-5p) - 1`
//!   and `p = -(right - i + 1) / width` (rows), and only the best (earliest) detection of a
//!   window counts; a window without one costs `-A_fn`;
//! - a detection outside every window scores `A_fp · S(p)` with `p` its distance (rows) past the
//!   previous window's right edge over that window's width less one, or `p = 3` (S = -1) before
//!   the first window, so a late detection just after a window costs less than a stray one.
//!
//! Per profile (standard `A_fp = 0.11`, low-FP 0.22, low-FN `A_fn = 2`) the file scores are
//! summed and normalised as `100·(S - S_null) / (S_perfect - S_null)`, with the null detector
//! (no detection: `-A_fn` per window) and the perfect one (`A_tp` per window). NAB's own runner
//! also sweeps each detector's threshold for its best score per profile; a tidewatch model's
//! threshold is calibrated from its training rows instead, so no sweep is done here.
//!
//! The point metrics of the report take a row inside a window as anomalous.

use std::collections::HashMap;
use std::path::Path;

use super::{
    BacktestError, LabelledFile, Outcome, Report, Runs, Settings, absolute, io, progress,
    run_entity,
};

/// NAB's cost profiles `(A_tp, A_fp, A_fn)`: standard, reward low FP, reward low FN.
pub const NAB_PROFILES: [(f64, f64, f64); 3] =
    [(1.0, 0.11, 1.0), (1.0, 0.22, 1.0), (1.0, 0.11, 2.0)];

/// NAB's probationary rows of a file of `rows` rows: 15 %, at most 750.
pub fn probation(rows: usize) -> usize {
    (rows * 15 / 100).min(750)
}

fn scaled_sigmoid(position: f64) -> f64 {
    if position >= 3.0 { -1.0 } else { 2.0 / (1.0 + (5.0 * position).exp()) - 1.0 }
}

/// The rows where `flags` opens (rises from normal to anomalous).
pub fn onsets(flags: &[bool]) -> Vec<bool> {
    flags.iter().enumerate().map(|(row, flag)| *flag && (row == 0 || !flags[row - 1])).collect()
}

/// One file's NAB tallies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NabFile {
    /// Per profile: (score, null score, perfect score).
    pub scores: [(f64, f64, f64); 3],
    /// Windows that have rows after the probationary period.
    pub windows: u64,
    /// Those with a detection.
    pub detected: u64,
    /// Detections outside every window.
    pub false_positives: u64,
}

/// Scores the detections (`flags`) of one file against its windows (`[start, end]`, ms,
/// inclusive) as NAB's sweeper does, rows before `probation` left out.
pub fn score_file(
    times: &[i64],
    windows: &[(i64, i64)],
    flags: &[bool],
    probation: usize,
) -> NabFile {
    // Window rows: the first row at or after the start .. the last at or before the end.
    let spans: Vec<(usize, usize)> = windows
        .iter()
        .filter_map(|(start, end)| {
            let left = times.iter().position(|time| time >= start)?;
            let right = times.iter().rposition(|time| time <= end)?;
            (left <= right).then_some((left, right))
        })
        .collect();
    let mut best: Vec<Option<f64>> = vec![None; spans.len()];
    let scored: Vec<bool> = spans.iter().map(|(_, right)| *right >= probation).collect();
    let mut file = NabFile::default();
    let mut fp_unweighted = Vec::new();
    let mut window = 0usize;
    let mut previous: Option<(usize, usize)> = None;
    for (row, flagged) in flags.iter().enumerate().take(times.len()) {
        while window < spans.len() && spans[window].1 < row {
            previous = Some(spans[window]);
            window += 1;
        }
        let inside = spans.get(window).filter(|(left, right)| *left <= row && row <= *right);
        if !*flagged || row < probation {
            continue;
        }
        match inside {
            Some((left, right)) => {
                let width = (right - left + 1) as f64;
                let position = -((right - row + 1) as f64) / width;
                let score = scaled_sigmoid(position) / scaled_sigmoid(-1.0);
                let slot = &mut best[window];
                *slot = Some(slot.map_or(score, |current: f64| current.max(score)));
            }
            None => {
                let position = match previous {
                    None => 3.0,
                    Some((left, right)) => {
                        let width = (right - left + 1) as f64;
                        (row - right) as f64 / (width - 1.0).max(1.0)
                    }
                };
                fp_unweighted.push(scaled_sigmoid(position));
                file.false_positives += 1;
            }
        }
    }
    file.windows = scored.iter().filter(|scored| **scored).count() as u64;
    file.detected =
        best.iter().zip(&scored).filter(|(best, scored)| **scored && best.is_some()).count() as u64;
    for (profile, (a_tp, a_fp, a_fn)) in NAB_PROFILES.iter().enumerate() {
        let mut score: f64 = fp_unweighted.iter().map(|unweighted| unweighted * a_fp).sum();
        for (best, scored) in best.iter().zip(&scored) {
            if *scored {
                score += best.map_or(-a_fn, |best| best * a_tp);
            }
        }
        let windows = file.windows as f64;
        file.scores[profile] = (score, -a_fn * windows, a_tp * windows);
    }
    file
}

/// NAB's normalised scores over files.
fn normalised(files: &[NabFile]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (profile, value) in out.iter_mut().enumerate() {
        let (mut score, mut null, mut perfect) = (0.0, 0.0, 0.0);
        for file in files {
            score += file.scores[profile].0;
            null += file.scores[profile].1;
            perfect += file.scores[profile].2;
        }
        *value = if perfect == null { 0.0 } else { 100.0 * (score - null) / (perfect - null) };
    }
    out
}

/// Puts NAB's scores and counts into a report in place of the SKAB-style changepoint ones.
fn apply(report: &mut Report, files: &[NabFile]) {
    let [standard, low_fp, low_fn] = normalised(files);
    report.nab_standard = standard;
    report.nab_lowfp = low_fp;
    report.nab_lowfn = low_fn;
    report.changepoints = files.iter().map(|file| file.windows).sum();
    report.changepoints_detected = files.iter().map(|file| file.detected).sum();
    report.changepoints_false = files.iter().map(|file| file.false_positives).sum();
}

/// The NAB protocol over `dir` (holding `data/` and `labels/combined_windows.json`).
pub fn nab(dir: &Path, settings: &Settings) -> Result<Outcome, BacktestError> {
    let dir = &absolute(dir)?;
    let labels_path = dir.join("labels/combined_windows.json");
    let text = std::fs::read_to_string(&labels_path)
        .map_err(io(format!("reading {}", labels_path.display())))?;
    let labels: HashMap<String, Vec<[String; 2]>> =
        serde_json::from_str(&text).map_err(|error| BacktestError::Data {
            path: labels_path.clone(),
            message: error.to_string(),
        })?;
    let mut names: Vec<&String> = labels.keys().collect();
    names.sort();
    let mut runs = Runs::default();
    let (mut model_files, mut baseline_files) = (Vec::new(), Vec::new());
    for (index, name) in names.iter().enumerate() {
        progress(settings, index, names.len(), name);
        let path = dir.join("data").join(name);
        let mut file = LabelledFile::read_unlabelled(&path, ',', "timestamp")?;
        let windows = labels[*name]
            .iter()
            .map(|[start, end]| {
                let parse = |text: &str| {
                    tidewatch_api::parse_timestamp(text, tidewatch_api::TimestampFormat::Auto)
                        .map_err(|error| BacktestError::Data {
                            path: labels_path.clone(),
                            message: format!("{name}: {error}"),
                        })
                };
                Ok((parse(start)?, parse(end)?))
            })
            .collect::<Result<Vec<(i64, i64)>, BacktestError>>()?;
        file.labels = file
            .times
            .iter()
            .map(|time| windows.iter().any(|(start, end)| start <= time && time <= end))
            .collect();
        file.changepoints = vec![false; file.times.len()];
        let first = probation(file.times.len());
        let entity_dir = settings.work_dir.join(format!("file-{index}"));
        let predictions = run_entity(
            &mut runs,
            name,
            &entity_dir,
            (&path, Some(first)),
            &file,
            first,
            "label",
            settings,
        )?;
        model_files.push(score_file(&file.times, &windows, &onsets(&predictions.model), first));
        if let Some(baseline) = &predictions.baseline {
            baseline_files.push(score_file(&file.times, &windows, &onsets(baseline), first));
        }
    }
    progress(settings, names.len(), names.len(), "done");
    let mut outcome = runs.outcome(settings);
    apply(&mut outcome.report, &model_files);
    if let Some(baseline) = outcome.baseline.as_mut() {
        apply(baseline, &baseline_files);
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minutes(count: i64) -> Vec<i64> {
        (0..count).map(|minute| minute * 60_000).collect()
    }

    #[test]
    fn an_alarm_is_detected_once_where_it_opens() {
        let flags = [true, true, false, false, true, true, true, false];
        let expected = [true, false, false, false, true, false, false, false];
        assert_eq!(onsets(&flags), expected);
    }

    #[test]
    fn the_probationary_period_is_15_percent_at_most_750_rows() {
        assert_eq!(probation(1000), 150);
        assert_eq!(probation(4032), 604);
        assert_eq!(probation(22_695), 750);
    }

    #[test]
    fn an_early_detection_scores_a_tp_and_a_miss_costs_a_fn() {
        let times = minutes(100);
        // One window over rows 40..=49.
        let windows = [(40 * 60_000, 49 * 60_000)];
        let mut flags = vec![false; 100];
        flags[40] = true; // at the window's left edge: the full A_tp
        flags[45] = true; // later in the same window: ignored (the best counts)
        let file = score_file(&times, &windows, &flags, 15);
        assert_eq!((file.windows, file.detected, file.false_positives), (1, 1, 0));
        for (profile, (a_tp, _, a_fn)) in NAB_PROFILES.iter().enumerate() {
            let (score, null, perfect) = file.scores[profile];
            assert!((score - a_tp).abs() < 1e-12, "{score}");
            assert_eq!((null, perfect), (-a_fn, *a_tp));
        }
        assert!((normalised(&[file])[0] - 100.0).abs() < 1e-9);
        let missed = score_file(&times, &windows, &[false; 100], 15);
        assert_eq!(missed.detected, 0);
        assert!(normalised(&[missed])[0].abs() < 1e-12);
    }

    #[test]
    fn false_positives_cost_less_just_after_a_window_and_none_in_probation() {
        let times = minutes(100);
        let windows = [(40 * 60_000, 49 * 60_000)];
        let mut stray = vec![false; 100];
        stray[30] = true; // before any window: S(3) = -1, costs A_fp
        stray[5] = true; // probationary: not scored
        let file = score_file(&times, &windows, &stray, 15);
        assert_eq!(file.false_positives, 1);
        assert!((file.scores[0].0 - (-0.11 - 1.0)).abs() < 1e-12, "{:?}", file.scores[0]);
        let mut late = vec![false; 100];
        late[50] = true; // one row past the window's right edge
        let file = score_file(&times, &windows, &late, 15);
        let expected = 0.11 * scaled_sigmoid(1.0 / 9.0) - 1.0;
        assert!((file.scores[0].0 - expected).abs() < 1e-12, "{:?}", file.scores[0]);
        assert!(file.scores[0].0 > -0.11 - 1.0, "cheaper than a stray one");
    }
}
